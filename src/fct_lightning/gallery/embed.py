"""``fct-embed``: one stage's image model over a dataset split or a folder of image files -> stored embeddings.

``--checkpoint`` is a stage's ``best.ckpt``, or an *external* model the library did not train: a TorchScript or
``torch.export`` file with its JSON sidecar (``<file>.json``: the file's pinned sha256, ``image_size``, ``mean``,
``std``, ``role``; see :mod:`fct_lightning.models.external`, which also says what loading such a file can execute).
An external model embeds a folder of image files (``--images``) only: it belongs to no dataset of the library.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fct_lightning import chain
from fct_lightning.data import DATAMODULES
from fct_lightning.data.transforms import build_transforms
from fct_lightning.devices import resolve_device
from fct_lightning.gallery.files import (
    FORMAT,
    check_out,
    publish,
    sidecar,
    write_json,
    writing,
)
from fct_lightning.models.external import is_external, load_external
from fct_lightning.models.inputs import InputSpec
from fct_lightning.runs import config_data_settings, eval_data_settings
from fct_lightning.stages.base import serve_input
from fct_lightning.stages.checkpoints import (
    CheckpointError,
    checkpoint_meta,
    read_checkpoint,
)
from fct_lightning.stages.loading import load_stage

log = logging.getLogger(__name__)

#: the stages whose model embeds images by itself (their variants' spaces are query spaces); a transformation's
#: gallery space maps stored embeddings instead
IMAGE_STAGES = tuple(dict.fromkeys(v.stage for v in chain.VARIANTS.values()
                                   if v.spaces and all(s.embed == "query" for s in v.spaces)))
NATIVE_SIZE = {"cifar": 32}  # families whose images are stored at one size (the datamodules refuse others)


class ImageList(Dataset):
    """Image files -> ``(evaluation view, readable, index)``, as an evaluation loader yields them.

    With ``skip_unreadable`` a file that cannot be decoded gives a zero image and ``readable = 0`` (the caller
    drops its row); otherwise the error, which names the file, ends the run.
    """

    def __init__(self, paths: list[str], transform: Callable[[Tensor], Tensor], family: str, image_size: int,
                 skip_unreadable: bool = False) -> None:
        self.paths, self.transform, self.family = paths, transform, family
        self.image_size, self.skip_unreadable = image_size, skip_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        from fct_lightning.data.folder import load_image

        try:
            img = load_image(self.paths[i])
        except (ValueError, OSError) as err:
            if not self.skip_unreadable:
                raise ValueError(f"{err} (or pass --skip_unreadable to leave such files out)") from err
            log.warning("left out %s: %s", self.paths[i], err)
            return torch.zeros(3, self.image_size, self.image_size), 0, i
        native = NATIVE_SIZE.get(self.family)
        if native is not None and tuple(img.shape[-2:]) != (native, native):
            raise ValueError(f"{self.paths[i]} is {tuple(img.shape[-2:])} pixels; this {self.family}-family model "
                             f"reads {native}x{native} images, as it was trained: resize the gallery's images first")
        return self.transform(img), 1, i


def data_settings(checkpoint: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The evaluation-relevant data settings of the run that wrote ``checkpoint``: the datamodule's arguments
    saved in the checkpoint, updated by the run's ``config.yaml`` next to it when that is there."""
    settings = eval_data_settings(ckpt.get("datamodule_hyper_parameters"))
    cfg = checkpoint.parent / "config.yaml"
    if cfg.is_file():
        settings.update(config_data_settings(cfg))
    return settings


def image_view(dataset: str, settings: dict[str, Any]) -> tuple[type, int, Callable[[Tensor], Tensor]]:
    """``(datamodule class, image size, evaluation transform)`` with which a model of ``dataset`` reads image files."""
    cls = DATAMODULES[dataset]
    if cls.family == "digits":
        raise ValueError("the digits models read scikit-learn's 8x8 arrays, not image files; use --split")
    size = settings.get("image_size") or cls.default_image_size
    return cls, size, build_transforms(cls.family, False, 1, size, cls.mean or None, cls.std or None)


def view_input(dataset: str, size: int) -> InputSpec | None:
    """The input :func:`image_view` serves a model of ``dataset`` at ``size`` (None for a dataset without one, such
    as an external model's), for :func:`~fct_lightning.stages.base.serve_input`."""
    cls = DATAMODULES.get(dataset)
    return InputSpec(size, tuple(cls.mean), tuple(cls.std)) if cls is not None and cls.mean else None


def list_images(folder: Path) -> tuple[list[str], list[str]]:
    """The image files below ``folder``, sorted, and the files skipped there (logged); an error when there are none."""
    from fct_lightning.data.folder import IMG_EXTENSIONS, find_images

    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder of images")
    paths, skipped = find_images(folder)
    for line in skipped[:20]:
        log.warning("skipped %s", line)
    if not paths:
        raise ValueError(f"--images {folder} holds no image files (looked for {', '.join(IMG_EXTENSIONS)}, in "
                         "sub-folders too)")
    return paths, skipped


#: the ``stage`` that the metadata of an external model (TorchScript / ``torch.export`` file) names
EXTERNAL = "external"


def external_view(spec: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """The evaluation view of an external model's sidecar ``spec``: shorter side resized to ``image_size``, centre
    crop ``image_size`` x ``image_size`` (grey for one channel), scaled to ``[0, 1]``, normalised by ``mean``,
    ``std``."""
    from torchvision.transforms import v2

    size = spec["image_size"]
    grey = [v2.Grayscale(1)] if spec["in_channels"] == 1 else []
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *grey,
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])])


def load_external_stage(path: str | Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(model, metadata, data settings)`` of an external model file, in the shape :func:`load_image_stage` gives:
    the metadata names stage ``external``, the sidecar's ``role``, and the file's sha256 as ``digest`` (its first
    16 hex digits, as for checkpoints; ``sha256`` holds all of it)."""
    model = load_external(path)
    spec = model.spec
    meta = {"stage": EXTERNAL, "role": spec["role"], "dataset": None, "path": str(Path(path).resolve()),
            "digest": spec["sha256"][:16], "sha256": spec["sha256"], "format": model.kind}
    return model, meta, {"image_size": spec["image_size"]}


def load_image_stage(checkpoint: str | Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(module in eval mode, metadata with digest, data settings)`` of an image stage's checkpoint (old,
    side_info, new or bct) or of an external model file (:func:`load_external_stage`); other checkpoints are
    refused with the reason and the fix."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist; pass a stage's best.ckpt, e.g. "
                                "artifacts/<dataset>/old/best.ckpt")
    if is_external(checkpoint):
        return load_external_stage(checkpoint)
    ckpt = read_checkpoint(checkpoint, "embedding")
    stage = checkpoint_meta(ckpt, checkpoint, "embedding")["stage"]
    if stage not in IMAGE_STAGES:
        raise CheckpointError(
            f"{checkpoint} is a '{stage}' checkpoint; fct-embed runs an image model ({', '.join(IMAGE_STAGES)}). "
            "A transformation maps stored embeddings: embed the gallery with the old and side_info checkpoints, "
            "then run fct-transform on those files.")
    settings = data_settings(checkpoint, ckpt)
    del ckpt
    module, meta = load_stage(checkpoint, stage, (stage,))
    return module.eval(), meta, settings


def _image_loader(folder: Path, dataset: str, settings: dict[str, Any], skip_unreadable: bool,
                  pin: bool) -> tuple[DataLoader, list[str], dict[str, Any]]:
    """A loader over the image files below ``folder`` with the evaluation view of ``dataset`` at the trained size.

    No datamodule is built: it would look for the training data, which a serving machine need not have.
    """
    if dataset == EXTERNAL:
        family, size, view = EXTERNAL, settings["image_size"], external_view(settings["external"])
    else:
        cls, size, view = image_view(dataset, settings)
        family = cls.family
    paths, skipped = list_images(folder)
    loader = DataLoader(ImageList(paths, view, family, size, skip_unreadable),
                        batch_size=settings.get("eval_batch_size") or 256,
                        num_workers=settings.get("num_workers") or 0, pin_memory=pin)
    ids = [os.path.relpath(p, folder) for p in paths]
    return loader, ids, {"images": str(folder.resolve()), "skipped": len(skipped), "image_size": size}


@torch.no_grad()
def embed(
    checkpoint: str | Path,
    out: str | Path,
    split: str | None = None,
    images: str | Path | None = None,
    data_root: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    skip_unreadable: bool = False,
) -> Path:
    """Embed a dataset split (``split``; default the evaluation split) or the image files below ``images``
    with the image model of ``checkpoint``; write ``out`` (``.npy``) and the files describing it.

    Rows follow the split's item order, or the sorted file paths (``out.ids.txt``). With ``skip_unreadable``,
    files that cannot be decoded are left out of the rows and listed in ``out.json``.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    out = check_out(out, overwrite)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if split is not None and images is not None:
        raise ValueError("give --split (a split of the checkpoint's dataset) or --images (a folder), not both")
    dev = resolve_device(device)
    module, meta, settings = load_image_stage(checkpoint)
    module.to(dev)
    stage, dataset = meta["stage"], meta.get("dataset") or "digits"
    if stage == EXTERNAL:
        if images is None:
            raise ValueError(f"{checkpoint} is an external model: it belongs to no dataset split; embed a folder of "
                             "image files with --images")
        dataset, settings["external"] = EXTERNAL, module.spec
    settings.update({k: v for k, v in (("root", data_root), ("eval_batch_size", batch_size),
                                       ("num_workers", num_workers)) if v is not None})
    ids: list[str] | None = None
    if images is not None:
        loader, ids, source = _image_loader(Path(images), dataset, settings, skip_unreadable, dev.type == "cuda")
        serve_input(module, view_input(dataset, source["image_size"]))  # read as trained to (models.inputs)
    else:
        dm = DATAMODULES[dataset](**settings)
        serve_input(module, dm)
        split = split or dm.eval_split
        loader = dm.eval_dataloader(split)
        source = {"dataset": dataset, "split": split, "root": str(Path(dm.root).resolve()),
                  "image_size": dm.image_size}
    rows, dim = len(loader.dataset), int(module.embedding_dim)
    labels = np.full(rows, -1, dtype=np.int64)
    keep = np.ones(rows, dtype=bool)
    with writing(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        for x, y, idx in loader:
            emb = module.query_embed(x.to(dev, non_blocking=True)).float()
            if not torch.isfinite(emb).all():
                raise FloatingPointError(f"{checkpoint} gave a NaN or infinite embedding for a batch of {source}; "
                                         "the checkpoint is broken: re-train the stage")
            where = torch.as_tensor(idx).numpy()
            arr[where] = emb.cpu().numpy()
            if ids is None:
                labels[where] = torch.as_tensor(y).numpy()
            else:
                keep[where] = torch.as_tensor(y).numpy() > 0
        arr.flush()
        del arr
        unreadable: list[str] = []
        if not keep.any():
            raise ValueError(f"none of the {rows} image files below {images} could be decoded (see the warnings); "
                             "nothing was written")
        if not keep.all():  # rows of files that could not be decoded: drop them, and their ids
            unreadable = [ids[i] for i in np.flatnonzero(~keep)]
            ids = [i for i, k in zip(ids, keep, strict=True) if k]
            _compact(tmp, keep)
            rows = int(keep.sum())
        fp = publish(tmp, out)
    files: dict[str, str | None] = {"ids": None, "labels": None}
    with writing(sidecar(out, "ids" if ids is not None else "labels")) as part:
        if ids is not None:
            with open(part, "w", encoding="utf-8") as fh:
                fh.writelines(f"{json.dumps(i)}\n" for i in ids)
        else:
            with open(part, "wb") as fh:
                np.save(fh, labels)
    files["ids" if ids is not None else "labels"] = sidecar(out, "ids" if ids is not None else "labels").name
    for kind, name in files.items():  # a replaced array's other companion no longer describes anything
        if name is None:
            sidecar(out, kind).unlink(missing_ok=True)
    write_json(sidecar(out, "meta"), {
        # an external model's rows are filed under its role (what fct-transform checks), the file's kind beside it
        "format": FORMAT, "stage": meta["role"] if stage == EXTERNAL else stage,
        **({"external": {"format": meta["format"], "sha256": meta["sha256"]}} if stage == EXTERNAL else {}),
        "dataset": None if stage == EXTERNAL else dataset, "checkpoint": str(checkpoint.resolve()),
        "digest": meta["digest"], "embedding_dim": dim, "rows": rows, "dtype": "float32", "fingerprint": fp,
        "source": source, **files, "unreadable": unreadable,
    })
    if unreadable:
        log.warning("left out %d file(s) that could not be decoded (listed in %s)", len(unreadable),
                    sidecar(out, "meta"))
    log.info("embedded %d items with %s in %.1f s", rows, checkpoint, time.perf_counter() - started)
    return out


def _compact(path: Path, keep: np.ndarray, chunk: int = 65536) -> None:
    """Rewrite the array file ``path`` with only the rows where ``keep`` is True."""
    src = np.load(path, mmap_mode="r")
    dst_path = path.with_suffix(".kept.part")  # a temporary file too: removed if a killed run leaves it
    try:
        dst = np.lib.format.open_memmap(dst_path, mode="w+", dtype=src.dtype, shape=(int(keep.sum()), src.shape[1]))
        at = 0
        for start in range(0, len(src), chunk):
            block = src[start:start + chunk][keep[start:start + chunk]]
            dst[at:at + len(block)] = block
            at += len(block)
        dst.flush()
        del dst, src
        os.replace(dst_path, path)
    finally:
        dst_path.unlink(missing_ok=True)

