"""The production path: embed a gallery once, then move it to each new model with h, without its images.

``fct-embed`` runs one stage's image model (``old``, ``side_info``, ``new`` or ``bct``) over a dataset split or
any folder of images and writes ``<out>.npy`` (float32 ``[N, d]``), with ``<out>.json`` saying which
checkpoint made it (content digest), and which items the rows are (``<out>.ids.txt`` for image files, one JSON
string per line; ``<out>.labels.npy`` for a dataset split). The stored gallery of a deployed system is the
``old`` embeddings plus the ``side_info`` features, computed when the images were at hand.

``fct-transform`` applies a trained transformation h to those stored arrays: ``h(old, side) -> [N, d_new]``,
``--batch_size`` rows at a time through memory-mapped files, so a gallery larger than memory works. It needs only
h's checkpoint (not the frozen image models), checks that the inputs were made by the old and side-info models h
was trained on (their digests, when the ``.json`` files are there), and writes each output to a temporary file
that replaces ``--out`` only when complete. With a FastFill h, ``--uncertainty_out`` also writes each item's
predicted log-variance: backfill the items with the highest values first.

Queries are embedded with the new model (``fct-embed --checkpoint .../new/best.ckpt``) and searched against the
transformed gallery, which is what ``fct-eval`` measures as ``fct+side/old``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fct_lightning.checkpoints import (
    CheckpointError,
    checkpoint_meta,
    file_digest,
    load_stage,
    read_checkpoint,
)
from fct_lightning.models.transformation import Transformation

log = logging.getLogger(__name__)

IMAGE_STAGES = ("old", "side_info", "new", "bct")
FORMAT = "fct-lightning embeddings"


# ----------------------------------------------------------------------------------------------- files
def sidecar(path: Path, kind: str) -> Path:
    """The file next to an embeddings array ``x.npy``: ``x.json`` (``meta``), ``x.ids.txt``, ``x.labels.npy``."""
    return path.with_suffix({"meta": ".json", "ids": ".ids.txt", "labels": ".labels.npy"}[kind])


def check_out(out: str | Path, overwrite: bool) -> Path:
    """An output path that ends in ``.npy`` and is not an existing file unless ``overwrite``."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out} must end in .npy (the embeddings are written as a NumPy array file)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'gallery.npy'}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it (it is replaced only once the new one is "
                         "complete), or choose another --out")
    return out


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    An existing ``path`` stays as it was until the new file is complete, so an error loses nothing.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with writing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_ids(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def load_array(path: str | Path, what: str) -> np.ndarray:
    """A stored ``[N, d]`` float array, memory-mapped; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {what} file {path} does not exist; write it with fct-embed (or np.save an "
                                "[N, d] float array)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"the {what} file {path} cannot be read as a .npy array ({err}); the file is corrupt or "
                         "not a NumPy array file. Re-create it with fct-embed.") from err
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"the {what} file {path} holds a {arr.dtype} array of shape {arr.shape}; an [N, d] "
                         "float array (one embedding per row) is needed")
    return arr


def read_meta(path: Path) -> dict[str, Any] | None:
    """The ``.json`` written next to an embeddings file by fct-embed or fct-transform, or None if there is none."""
    side = sidecar(path, "meta")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{side} (the description of {path.name}) cannot be read ({err}); restore it or delete "
                         "it to skip the checks it allows") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{side} is not an fct-lightning embeddings description; rename it or delete it")
    if meta.get("rows") is not None and meta["rows"] != _rows(path):
        raise ValueError(f"{side} describes {meta['rows']} rows but {path} has {_rows(path)}: the two files do not "
                         "belong together (one was replaced). Re-create both with fct-embed.")
    return meta


def _rows(path: Path) -> int:
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])


# ----------------------------------------------------------------------------------------------- fct-embed
class ImageList(Dataset):
    """Image files -> ``(evaluation view, 0, index)``, as an evaluation loader yields them."""

    def __init__(self, paths: list[str], transform: Callable[[Tensor], Tensor], square: int | None) -> None:
        self.paths, self.transform, self.square = paths, transform, square

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        from fct_lightning.data.folder import load_image, square_for_eval

        img = load_image(self.paths[i])
        if self.square is not None and tuple(img.shape[-2:]) != (self.square, self.square):
            img = square_for_eval(img, self.square, self.square)  # 32 px families: resize + centre square
        return self.transform(img), 0, i


def _device(device: str) -> torch.device:
    from fct_lightning.evaluation import resolve_device

    return resolve_device(device)


def stage_data_settings(checkpoint: Path) -> dict[str, Any]:
    """The evaluation-relevant data settings of the run that wrote ``checkpoint`` (its ``config.yaml``)."""
    from fct_lightning.evaluation import EVAL_DATA_KEYS

    cfg = checkpoint.parent / "config.yaml"
    if not cfg.is_file():
        return {}
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    return {k: data[k] for k in EVAL_DATA_KEYS if data.get(k) is not None}


def _check_batch(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")


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
) -> Path:
    """Embed a dataset split (``split``; default the evaluation split) or the image files below ``images``
    with the image model of ``checkpoint``; write ``out`` (``.npy``) and its ``.json`` (see the module doc)."""
    from fct_lightning.data import DATAMODULES
    from fct_lightning.data.folder import find_images

    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    out = check_out(out, overwrite)
    _check_batch(batch_size)
    if split is not None and images is not None:
        raise ValueError("give --split (a split of the checkpoint's dataset) or --images (a folder), not both")
    dev = _device(device)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist; pass a stage's best.ckpt, e.g. "
                                "artifacts/<dataset>/old/best.ckpt")
    stage = checkpoint_meta(read_checkpoint(checkpoint, "embedding"), checkpoint, "embedding")["stage"]
    if stage not in IMAGE_STAGES:
        raise CheckpointError(
            f"{checkpoint} is a '{stage}' checkpoint; fct-embed runs an image model ({', '.join(IMAGE_STAGES)}). "
            "A transformation maps stored embeddings: embed the gallery with the old and side_info checkpoints, "
            "then run fct-transform on those files.")
    module, meta = load_stage(checkpoint, stage, (stage,))
    module.to(dev).eval()
    dataset = meta.get("dataset") or "digits"
    settings = stage_data_settings(checkpoint)
    if data_root:
        settings["root"] = data_root
    if batch_size:
        settings["eval_batch_size"] = batch_size
    if num_workers is not None:
        settings["num_workers"] = num_workers
    dm = DATAMODULES[dataset](**settings)
    source: dict[str, Any]
    ids: list[str] | None = None
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder} is not a folder of images")
        if dm.family == "digits":
            raise ValueError("the digits models read scikit-learn's 8x8 arrays, not image files; use --split")
        paths, skipped = find_images(folder)
        for line in skipped[:20]:
            log.warning("skipped %s", line)
        if not paths:
            raise ValueError(f"--images {folder} holds no image files (looked for {', '.join(_extensions())}, "
                             "in sub-folders too)")
        ids = [os.path.relpath(p, folder) for p in paths]
        square = dm.image_size if dm.family == "cifar" else None
        loader = DataLoader(ImageList(paths, dm.transform(False, 1), square), batch_size=dm.eval_batch_size,
                            num_workers=dm.num_workers, pin_memory=dev.type == "cuda")
        source = {"images": str(folder.resolve()), "skipped": len(skipped)}
    else:
        split = split or dm.eval_split
        loader = dm.eval_dataloader(split)
        source = {"dataset": dataset, "split": split, "root": str(Path(dm.root).resolve())}
    rows = len(loader.dataset)
    dim = int(module.embedding_dim)
    labels = np.full(rows, -1, dtype=np.int64)
    with writing(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        for x, y, idx in loader:
            emb = module.query_embed(x.to(dev, non_blocking=True)).float()
            if not torch.isfinite(emb).all():
                raise FloatingPointError(f"{checkpoint} gave a NaN or infinite embedding for a batch of {source}; "
                                         "the checkpoint is broken: re-train the stage")
            where = torch.as_tensor(idx).cpu().numpy()
            arr[where] = emb.cpu().numpy()
            labels[where] = torch.as_tensor(y).cpu().numpy()
        arr.flush()
        del arr
        files = {"ids": None, "labels": None}
        if ids is not None:
            with writing(sidecar(out, "ids")) as ids_tmp, open(ids_tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(i) + "\n" for i in ids)
            files["ids"] = sidecar(out, "ids").name
        else:
            with writing(sidecar(out, "labels")) as lab_tmp, open(lab_tmp, "wb") as fh:
                np.save(fh, labels)
            files["labels"] = sidecar(out, "labels").name
        for kind, name in files.items():  # a replaced file's other companion no longer describes anything
            if name is None:
                sidecar(out, kind).unlink(missing_ok=True)
        write_json(sidecar(out, "meta"), {
            "format": FORMAT, "stage": stage, "dataset": dataset, "checkpoint": str(checkpoint),
            "digest": meta["digest"], "embedding_dim": dim, "rows": rows, "dtype": "float32", "source": source,
            **files,
        })
    log.info("embedded %d items with %s in %.1f s", rows, checkpoint, time.perf_counter() - started)
    return out


def _extensions() -> tuple[str, ...]:
    from fct_lightning.data.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


# ----------------------------------------------------------------------------------------------- fct-transform
def load_transformation(path: str | Path) -> tuple[Transformation, dict[str, Any]]:
    """h from a transformation checkpoint, without the frozen image models it was trained with.

    The checkpoint holds h's weights only (the frozen models are not saved with it), so a serving machine needs
    nothing else. Returns ``(h in eval mode, the checkpoint's fct metadata + path and digest)``.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, "transformation")
    meta = checkpoint_meta(ckpt, path, "transformation")
    if meta["stage"] != "transformation":
        raise CheckpointError(
            f"{path} is a '{meta['stage']}' checkpoint; fct-transform needs a transformation checkpoint "
            "(artifacts/<dataset>/transformation/best.ckpt, or fastfill/ ... for the other variants).")
    hp = ckpt.get("hyper_parameters", {})
    state = {k[2:]: v for k, v in ckpt["state_dict"].items() if k.startswith("h.")}
    try:
        side = state.get("side_branch.0.0.weight")
        h = Transformation(
            old_dim=int(state["old_branch.0.0.weight"].shape[1]), new_dim=int(state["head.weight"].shape[0]),
            side_dim=None if side is None else int(side.shape[1]),
            branch_width_factor=int(hp.get("branch_width_factor", 2)), mixer_width=int(hp.get("mixer_width", 2048)),
            mixer_depth=int(hp.get("mixer_depth", 2)), uncertainty=bool(hp.get("uncertainty", False)),
        )
        h.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"the transformation checkpoint {path} does not fit the current Transformation "
                              f"({type(err).__name__}: {err}); it was written by an incompatible version. "
                              "Re-train the transformation stage.") from err
    return h.eval(), dict(meta, path=str(path), digest=file_digest(path))


def _check_input(arr: np.ndarray, path: Path, role: str, dim: int, h_meta: dict[str, Any]) -> dict[str, Any] | None:
    """Dimension and provenance of one stored input of h (``old`` or ``side_info``)."""
    what = {"old": "old-model embeddings", "side_info": "side-info features"}[role]
    if arr.shape[1] != dim:
        raise ValueError(
            f"dimension mismatch: {path} holds {arr.shape[1]}-d rows, but this transformation takes {dim}-d "
            f"{what} (its {role} model's size); these were made by another model. Embed with the {role} "
            f"checkpoint the transformation was trained on ({h_meta.get('path')}).")
    meta = read_meta(path)
    want = h_meta.get(f"{role}_digest")
    if meta is None:
        log.warning("%s has no %s next to it: which model made these rows cannot be checked. They must come from "
                    "the %s checkpoint with content digest %s.", path, sidecar(path, "meta").name, role, want)
        return None
    if meta.get("stage") != role:
        raise ValueError(f"{path} holds '{meta.get('stage')}' embeddings (see {sidecar(path, 'meta').name}); "
                         f"this input needs {what}: embed the gallery with the {role} checkpoint.")
    if want and meta.get("digest") != want:
        raise ValueError(
            f"{path} was embedded with the {role} checkpoint {meta.get('checkpoint')} (content {meta.get('digest')}), "
            f"but the transformation {h_meta.get('path')} was trained on another {role} model (content {want}). "
            f"h only maps the embeddings of its own {role} model: embed with that checkpoint, or train a "
            f"transformation on this {role} model.")
    return meta


def _same_items(old_path: Path, old_meta: dict[str, Any] | None, side_path: Path,
                side_meta: dict[str, Any] | None) -> None:
    """Old embeddings and side-info must describe the same items in the same order."""
    if not old_meta or not side_meta:
        return
    if old_meta.get("ids") and side_meta.get("ids"):
        a, b = sidecar(old_path, "ids"), sidecar(side_path, "ids")
        if a.is_file() and b.is_file():
            for row, (x, y) in enumerate(zip(read_ids(a), read_ids(b), strict=False)):
                if x != y:
                    raise ValueError(f"row {row} is {x!r} in {a.name} but {y!r} in {b.name}: the old embeddings and "
                                     "the side-info list the items in another order. Embed both from the same "
                                     "folder (fct-embed lists the files in the same sorted order).")
    if old_meta.get("source") != side_meta.get("source"):
        raise ValueError(f"{old_path} and {side_path} were embedded from different items ({old_meta.get('source')} "
                         f"vs {side_meta.get('source')}); embed both from the same split or folder")


@torch.no_grad()
def transform(
    checkpoint: str | Path,
    old: str | Path,
    out: str | Path,
    side: str | Path | None = None,
    uncertainty_out: str | Path | None = None,
    batch_size: int = 8192,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Map stored old embeddings (and side-info) into the new model's space with h; see the module doc."""
    started = time.perf_counter()
    out = check_out(out, overwrite)
    unc_out = check_out(uncertainty_out, overwrite) if uncertainty_out is not None else None
    _check_batch(batch_size)
    dev = _device(device)
    old_path = Path(old)
    if unc_out is not None and unc_out.resolve() == out.resolve():
        raise ValueError("--uncertainty_out must be another file than --out")
    if out.resolve() in {old_path.resolve(), *([Path(side).resolve()] if side else [])}:
        raise ValueError(f"--out {out} is one of the inputs; write the transformed gallery to a new file")
    h, h_meta = load_transformation(checkpoint)
    old_arr = load_array(old_path, "old embeddings")
    old_meta = _check_input(old_arr, old_path, "old", h.old_dim, h_meta)
    side_arr = side_meta = None
    if h.has_side_info:
        if side is None:
            raise ValueError(f"the transformation {checkpoint} uses side-info: pass the stored side-info features "
                             "with --side (fct-embed --checkpoint <artifacts>/<dataset>/side_info/best.ckpt)")
        side_path = Path(side)
        side_arr = load_array(side_path, "side-info")
        side_meta = _check_input(side_arr, side_path, "side_info", h.side_dim, h_meta)
        if len(side_arr) != len(old_arr):
            raise ValueError(f"{old_path} has {len(old_arr)} rows but {side_path} has {len(side_arr)}: the old "
                             "embeddings and the side-info must list the same items")
        _same_items(old_path, old_meta, side_path, side_meta)
    elif side is not None:
        raise ValueError(f"the transformation {checkpoint} was trained without side-info (h(old) alone); leave "
                         "--side out, or use the side-info transformation")
    if unc_out is not None and h.uncertainty_head is None:
        raise ValueError(f"--uncertainty_out needs a FastFill transformation (trained with --model.uncertainty "
                         f"true); {checkpoint} has no uncertainty head")
    h.to(dev)
    rows = len(old_arr)
    with writing(out) as tmp, (writing(unc_out) if unc_out is not None else _nothing()) as unc_tmp:
        res = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, h.new_dim))
        unc = (np.lib.format.open_memmap(unc_tmp, mode="w+", dtype=np.float32, shape=(rows,))
               if unc_tmp is not None else None)
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            o = _finite_rows(old_arr, start, stop, old_path)
            s = None if side_arr is None else _finite_rows(side_arr, start, stop, Path(side))
            o, s = o.to(dev), None if s is None else s.to(dev)
            if unc is not None:
                pred, log_var = h.forward_with_uncertainty(o, s)
                unc[start:stop] = log_var.float().reshape(len(pred), -1).mean(dim=1).cpu().numpy()
            else:
                pred = h(o, s)
            res[start:stop] = pred.float().cpu().numpy()
        res.flush()
        del res
        if unc is not None:
            unc.flush()
            del unc
        companions: dict[str, str | None] = {}
        for kind in ("ids", "labels"):  # the rows are the old file's items: its ids or labels describe them too
            src = sidecar(old_path, kind) if old_meta and old_meta.get(kind) else None
            companions[kind] = None
            if src is not None and src.is_file():
                with writing(sidecar(out, kind)) as part:
                    part.write_bytes(src.read_bytes())
                companions[kind] = sidecar(out, kind).name
            else:
                sidecar(out, kind).unlink(missing_ok=True)
        inputs = {"old": {"path": str(old_path), "digest": (old_meta or {}).get("digest")}}
        if side_arr is not None:
            inputs["side_info"] = {"path": str(side), "digest": (side_meta or {}).get("digest")}
        write_json(sidecar(out, "meta"), {
            "format": FORMAT, "stage": "transformation", "space": "fct+side" if h.has_side_info else "fct",
            "checkpoint": str(checkpoint), "digest": h_meta["digest"], "new_digest": h_meta.get("new_digest"),
            "dataset": h_meta.get("dataset"), "embedding_dim": h.new_dim, "rows": rows, "dtype": "float32",
            "source": (old_meta or {}).get("source"), "inputs": inputs,
            **companions,
            "uncertainty": str(unc_out) if unc_out is not None else None,
        })
    log.info("transformed %d rows with %s in %.1f s", rows, checkpoint, time.perf_counter() - started)
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _finite_rows(arr: np.ndarray, start: int, stop: int, path: Path) -> Tensor:
    chunk = np.array(arr[start:stop], dtype=np.float32)  # a copy: the input is a read-only memory map
    ok = np.isfinite(chunk).all(axis=1)
    if not ok.all():
        row = start + int(np.argmin(ok))
        raise ValueError(f"row {row} of {path} is not finite (NaN or inf); re-embed that item (or drop it from "
                         "the gallery) before transforming. Nothing was written.")
    return torch.from_numpy(chunk)


# ----------------------------------------------------------------------------------------------- entry points
def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The options both commands share, then the parsed arguments (and INFO logging for the timings)."""
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (once the new ones are "
                   "complete)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args


def embed_main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="fct-embed", description="Embed a split or a folder of images with one "
                                "stage's image model; writes OUT.npy and OUT.json (which checkpoint, which items).")
    p.add_argument("--checkpoint", required=True, help="an old, side_info, new or bct checkpoint (best.ckpt)")
    p.add_argument("--out", required=True, help="the embeddings file to write (.npy)")
    p.add_argument("--split", default=None, help="a split of the checkpoint's dataset (default: its eval split)")
    p.add_argument("--images", default=None, help="instead: a folder of image files (searched recursively)")
    p.add_argument("--data_root", "--data.root", dest="data_root", default=None,
                   help="where the dataset is (default: the root the stage was trained with)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    args = _parse(p, argv)
    out = embed(args.checkpoint, args.out, args.split, args.images, args.data_root, args.batch_size,
                args.num_workers, args.device, args.overwrite)
    print(f"embeddings written to {out} ({_rows(out)} x {json.loads(sidecar(out, 'meta').read_text())['embedding_dim']})")
    return out


def transform_main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="fct-transform", description="Map a stored gallery (old embeddings and "
                                "side-info, no images) into the new model's space with a trained transformation.")
    p.add_argument("--checkpoint", required=True, help="the transformation's checkpoint (transformation/best.ckpt)")
    p.add_argument("--old", required=True, help="the stored old-model embeddings (.npy, [N, d_old])")
    p.add_argument("--side", default=None, help="the stored side-info features (.npy, [N, d_side])")
    p.add_argument("--out", required=True, help="the transformed gallery to write (.npy, [N, d_new])")
    p.add_argument("--uncertainty_out", default=None,
                   help="FastFill: also write each item's log-variance (.npy, [N]); backfill the highest first")
    p.add_argument("--batch_size", type=int, default=8192,
                   help="rows per forward pass (h's activations: about 16 bytes x mixer width per row, "
                        "some 256 MiB at 8,192 rows and width 2,048)")
    args = _parse(p, argv)
    out = transform(args.checkpoint, args.old, args.out, args.side, args.uncertainty_out, args.batch_size,
                    args.device, args.overwrite)
    print(f"transformed gallery written to {out}")
    return out
