"""``fct-embed --store``: several image models over the same items in one pass, into the spaces of a store, on
Lightning's predict loop (any number of devices and nodes), resumable.

::

    embed_store(["old/best.ckpt", "side_info/best.ckpt"], "gallery", images="photos/")
    embed_store(["new/best.ckpt"], "queries", split="test", trainer={"devices": 8})

The pieces, each usable alone: :class:`ImageModels` (the models, one LightningModule, ``predict_step`` ->
``{role: embeddings}``), :class:`EmbedData` (rank 0 creates the store of the items, every rank then loads the rows of
its shards) and :class:`~fct_lightning.gallery.writer.StoreWriter` (writes the shards, publishes the spaces).
Each image is decoded and transformed once for all models, which is why their evaluation views must agree.
A killed job run again with the same arguments redoes only the shards that are not complete and verified.

An external model (a TorchScript or ``torch.export`` file with its sidecar, :mod:`fct_lightning.models.external`)
fills the space its sidecar's ``role`` names (``old`` by default), recorded with the file's sha256 as checkpoint
digest; it embeds folders of image files only, read with the view its sidecar gives.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from fct_lightning.gallery.embed import EXTERNAL, external_view, load_image_stage
from fct_lightning.gallery.items import FolderItems, SplitItems, common_view, shard_loader
from fct_lightning.gallery.writer import StoreWriter, everywhere
from fct_lightning.stages.base import serve_input
from fct_lightning.store import DEFAULT_SHARD_ROWS, DTYPES, SpaceSpec, create_store, open_store

log = logging.getLogger(__name__)

Items = FolderItems | SplitItems


class ImageModels(pl.LightningModule):
    """Image stages (role -> module with ``query_embed``) run on the same batch: ``{role: [B, d] embeddings}``.

    Args:
        models: role (the space name) -> stage module.
        dtype: the stored dtype; embeddings are cast on the device (float16 halves the copy to the host).
    """

    def __init__(self, models: dict[str, nn.Module], dtype: str = "float32") -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.out_dtype = getattr(torch, dtype)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0]
        return {role: m.query_embed(images).to(self.out_dtype) for role, m in self.models.items()}


class EmbedData(pl.LightningDataModule):
    """The items of a store: rank 0 creates the store (or checks an existing one holds these items); every rank
    then gets the rows of its pending shards (``writer.pending``) in shard-aligned batches.

    Args:
        items: the images (:class:`~fct_lightning.gallery.items.FolderItems` or ``SplitItems``).
        store: the store's folder.
        writer: the writer of the same run (it knows, after its setup, which shards this rank still writes).
        shard_rows: rows per shard of a new store.
        batch_size: images per batch.
        num_workers: DataLoader workers (decoding; also the readability check of a new folder store).
        skip_unreadable: leave image files that cannot be decoded out of a new store (listed in its provenance).
    """

    def __init__(self, items: Items, store: str | Path, writer: StoreWriter, shard_rows: int = DEFAULT_SHARD_ROWS,
                 batch_size: int = 256, num_workers: int = 0, skip_unreadable: bool = False) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank whose shards are done: no batches
        self.items, self.path, self.writer = items, Path(store), writer
        self.shard_rows, self.batch_size, self.num_workers = shard_rows, batch_size, num_workers
        self.skip_unreadable = skip_unreadable

    def setup(self, stage: str) -> None:
        """Rank 0 creates (or checks) the store; the other ranks wait for it. Every step that can fail runs
        through :func:`everywhere`, so that an error stops every rank, not only the one that met it."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        exists = everywhere(world, lambda: (self.path / "manifest.json").is_file() if rank == 0 else None)[0]
        # a new folder store: every rank lists the files (and checks its part of them); else rank 0 alone
        ids = everywhere(world, lambda: self.items.ids() if rank == 0 or not exists else [])[rank]
        left_out = self._left_out(ids, exists, rank, world) if isinstance(self.items, FolderItems) else []
        everywhere(world, lambda: self._create(ids, left_out) if rank == 0 else None)

    def _left_out(self, ids: list[str], exists: bool, rank: int, world: int) -> list[str]:
        """The image files to leave out, the same on every rank: those that cannot be decoded (each rank decodes
        every ``world``-th file) or, for an existing store, those its creation left out. Without
        ``skip_unreadable`` an unreadable file is an error, before anything is written."""
        if exists:  # checked when the store was created
            recorded = everywhere(world, lambda: open_store(self.path).manifest.get("provenance", {}).get(
                "unreadable", []) if rank == 0 else None)[0]
            if recorded and not self.skip_unreadable:
                raise ValueError(f"the store {self.path} was created with --skip_unreadable, which left out "
                                 f"{len(recorded)} file(s) (e.g. {recorded[0]}); pass --skip_unreadable again")
            return list(recorded)
        listings = everywhere(world, lambda: hashlib.sha256("\n".join(ids).encode()).hexdigest())
        if len(set(listings)) > 1:
            raise ValueError(f"the ranks found different files below {self.items.folder} (it changed while they "
                             "listed it); run again once the folder is complete")
        parts = everywhere(world, lambda: self.items.unreadable(range(rank, len(ids), world), self.num_workers))
        bad = dict(sorted(kv for part in parts for kv in part.items()))
        if bad and not self.skip_unreadable:
            first = next(iter(bad.values()))
            raise ValueError(f"{len(bad)} of the {len(ids)} image files below {self.items.folder} cannot be decoded "
                             f"({first}); nothing was written. Replace or remove them, or pass --skip_unreadable "
                             "to leave them out (they are listed in the store's provenance)")
        for row, why in list(bad.items())[:20]:
            log.warning("left out %s: %s", ids[row], why)
        return [ids[row] for row in bad]

    def _create(self, ids: list[str], left_out: list[str]) -> None:
        if left_out:
            drop = set(left_out)
            keep = [i for i, x in enumerate(ids) if x not in drop]
            if not keep:
                raise ValueError(f"none of the {len(ids)} image files below {self.items.folder} could be decoded "
                                 "(see the warnings); nothing was written")
            ids = [ids[i] for i in keep]
        labels = self.items.labels
        provenance = {"command": "fct-embed", **self.items.source}
        if isinstance(self.items, FolderItems):
            provenance["unreadable"] = left_out
        store = create_store(self.path, ids, labels, shard_rows=self.shard_rows, provenance=provenance)
        log.info("store %s: %d items in %d shards", store.path, store.rows, len(store.shards))

    def predict_dataloader(self) -> Any:
        store = open_store(self.path)
        shards = [store.shard(i) for i in self.writer.pending]
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return shard_loader(self.items.dataset(store), shards, self.batch_size, self.num_workers, pin)


class ExternalFolderItems(FolderItems):
    """The image files below ``folder``, read as the external model of sidecar ``spec`` reads them (its size and
    normalisation; see :func:`~fct_lightning.gallery.embed.external_view`)."""

    def __init__(self, folder: str | Path, spec: dict[str, Any]) -> None:
        self.folder, self.settings = Path(folder), {"image_size": spec["image_size"]}
        self.size, self.transform, self.family = spec["image_size"], external_view(spec), EXTERNAL
        self.view = {"family": EXTERNAL, "image_size": self.size, "mean": list(spec["mean"]),
                     "std": list(spec["std"])}
        self.source = {"images": str(self.folder.resolve()), "image_size": self.size}
        self.paths = []


def load_models(checkpoints: Sequence[str | Path], images: str | Path | None, split: str | None,
                data_root: str | None) -> tuple[dict[str, tuple[nn.Module, dict[str, Any]]], Items]:
    """The image stages of ``checkpoints`` (role -> ``(module, metadata)``) and the items they all read the same
    way (an error names the checkpoints whose views differ)."""
    if not checkpoints:
        raise ValueError("give at least one --checkpoint (an old, side_info, new or bct best.ckpt)")
    if split is not None and images is not None:
        raise ValueError("give --split (a split of the checkpoints' dataset) or --images (a folder), not both")
    models: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    items: dict[str, Items] = {}
    for path in checkpoints:
        module, meta, settings = load_image_stage(path)
        role = meta["role"] if meta["stage"] == EXTERNAL else meta["stage"]
        if role in models:
            raise ValueError(f"--checkpoint {models[role][1]['path']} and --checkpoint {path} are both '{role}' "
                             "checkpoints; a store holds one space per role: embed the other into another store")
        if data_root is not None:
            settings["root"] = data_root
        dataset = meta.get("dataset") or "digits"
        if meta["stage"] == EXTERNAL:
            if images is None:
                raise ValueError(f"--checkpoint {path} is an external model: it belongs to no dataset split; embed "
                                 "a folder of image files with --images")
            items[str(path)] = ExternalFolderItems(images, module.spec)
        else:
            items[str(path)] = FolderItems(images, dataset, settings) if images is not None else SplitItems(
                dataset, settings, split)
        models[role] = (module, meta)
    common_view({p: (it.view, it.describe()) for p, it in items.items()})
    served = next(iter(items.values()))
    for module, _ in models.values():  # each image model reads the batches as it was trained to (models.inputs)
        serve_input(module, getattr(served, "input", None))
    return models, served


def space_specs(models: dict[str, tuple[nn.Module, dict[str, Any]]], items: Items, dtype: str,
                precision: str) -> dict[str, SpaceSpec]:
    """One space per role: its dimension, dtype, checkpoint digest, whether rows are L2-normalised, and where the
    rows come from (no times or hosts: a rerun of the same command is the same job, and resumes)."""
    return {role: SpaceSpec(
        role=role, dim=int(module.embedding_dim), dtype=dtype, checkpoint_digest=meta["digest"],
        normalized=bool(module.spec["normalized"] if meta["stage"] == EXTERNAL
                        else getattr(getattr(module, "net", None), "normalize", False)),
        provenance={"command": "fct-embed", "dataset": meta.get("dataset"), "source": items.source,
                    "precision": precision,
                    **({"external": {"format": meta["format"], "sha256": meta["sha256"]}}
                       if meta["stage"] == EXTERNAL else {})},
    ) for role, (module, meta) in models.items()}


def embed_store(
    checkpoints: Sequence[str | Path],
    store: str | Path,
    split: str | None = None,
    images: str | Path | None = None,
    data_root: str | None = None,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    batch_size: int | None = None,
    num_workers: int | None = None,
    skip_unreadable: bool = False,
    overwrite: bool = False,
    trainer: dict[str, Any] | None = None,
) -> Path:
    """Embed the items (the image files below ``images``, or a split: default the evaluation split) with every
    checkpoint's image model in one pass, into the store ``store`` (created by this call or by an earlier one for
    the same items), one space per checkpoint, named by its role.

    Args:
        checkpoints: old, side_info, new or bct checkpoints whose evaluation views agree (same size, same
            normalisation; else an error: run one call per view into the same store).
        store: the store's folder.
        split: a split of the checkpoints' dataset (ids ``"<split>/<index>"``, with labels).
        images: instead, a folder of image files (ids = paths relative to it, sorted).
        data_root: where the dataset is, for ``split`` (default: where the stage was trained).
        dtype: ``float32`` or ``float16`` on disk.
        shard_rows: rows per shard of a new store (an existing store keeps its own; another value is an error).
        batch_size: images per forward pass (default: the stage's ``eval_batch_size``, else 256).
        num_workers: DataLoader workers (default: the stage's).
        skip_unreadable: leave image files that cannot be decoded out of a new store (listed in its
            provenance); without it one such file stops the job, naming it, before anything is written.
        overwrite: replace spaces of the same names that other checkpoints (or options) wrote.
        trainer: more ``pytorch_lightning.Trainer`` arguments: ``accelerator``, ``devices``, ``num_nodes``,
            ``strategy``, ``precision`` (recorded in each space), ``enable_progress_bar``.

    Returns:
        The store's folder. Every rank returns once every space is published (rank 0 publishes them).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not stored; use one of {', '.join(DTYPES)}")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"--shard_rows {shard_rows!r} must be a positive integer (rows per shard)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if skip_unreadable and images is None:
        raise ValueError("--skip_unreadable applies to --images (a folder of files); a split's items are fixed")
    models, items = load_models(checkpoints, images, split, data_root)
    # benchmark=False: cuDNN's autotuner may pick other convolution algorithms in a rerun (other last bits)
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
               "enable_progress_bar": False, "benchmark": False, **(trainer or {})}
    for fixed in ("use_distributed_sampler", "callbacks", "inference_mode"):
        if fixed in options:
            raise ValueError(f"the Trainer option {fixed!r} is set by fct-embed (each rank embeds its own shards)")
    specs = space_specs(models, items, dtype, str(options.get("precision", "32-true")))
    writer = StoreWriter(store, specs, overwrite)
    data = EmbedData(items, store, writer, shard_rows, batch_size or items.settings.get("eval_batch_size") or 256,
                     num_workers if num_workers is not None else items.settings.get("num_workers") or 0,
                     skip_unreadable)
    module = ImageModels({role: m for role, (m, _) in models.items()}, dtype)
    with warnings.catch_warnings():  # the writer reads the rows from the batch, not Lightning's batch indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        pl.Trainer(callbacks=[writer], use_distributed_sampler=False, **options).predict(
            module, datamodule=data, return_predictions=False)
    return Path(store)


__all__ = ["EmbedData", "ExternalFolderItems", "ImageModels", "embed_store", "load_models", "space_specs"]
