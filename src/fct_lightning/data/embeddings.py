"""Training h from stored embeddings: a datamodule over embedding stores (or in-memory arrays) instead of images.

The transformation stage learns h(old, side-info) -> new from the three models' embeddings of the same items. From
images it computes them with the frozen models; here they come from stores whose spaces ``old``, ``side_info``
(optional) and ``new`` hold them (``fct-embed --store``, or ``fct-store import`` for models that are not PyTorch).
Training batches have the form of the transformation stage's feature cache (``{"old", "side", "new": [B, d] float32,
"labels", "index"}``, from :class:`~fct_lightning.data.features.FeatureBatches`), so its ``training_step`` is the
same; validation batches carry the stored embeddings of the validation items with their labels and positions,
from which the stage computes the same cases (``fct+side/old``, ``old/old``, ``new/new``) as from images.

Memory: the training rows of every space are read into memory once, in their stored dtype (float16 rows stay
float16 and are widened per batch), and moved to the training device: ``rows x (d_old + d_side + d_new) x bytes``,
e.g. 1M items of three 128-d float16 spaces take 768 MB. Above ``max_memory_gb`` (default 16 GB) this is refused
with an error that names the size; there is no streaming path. The validation rows are read into host memory and
served in batches. Each stored row is one training view: a store of ``K`` augmented views per item holds them
as ``K`` rows (ids such as ``item/view``), and is read as ``K`` times as many items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fct_lightning.data.features import FeatureBatches
from fct_lightning.store import Store, StoreError, open_store, same_items

SPACES = {"old": "old", "side": "side_info", "new": "new"}
"""Batch key (as the feature cache names it) -> the store space that holds it."""
NEEDED = ("old", "new")


@dataclass
class StoredItems:
    """One set of items (training or validation) and the spaces that embed them.

    Attributes:
        where: what the items are, for messages (the store folders, or "the training arrays").
        rows: the number of items.
        arrays: batch key (``old``, ``side``, ``new``) -> ``[rows, dim]`` array, or a store to read it from.
        digests: batch key -> the checkpoint digest the space records (None: unknown, e.g. imported arrays).
        labels: ``[rows]`` int64 labels, or None.
        datasets: the datasets the spaces' provenance names (``fct-embed`` records it).
    """

    where: str
    rows: int
    arrays: dict[str, np.ndarray | Store]
    digests: dict[str, str | None]
    labels: np.ndarray | None
    datasets: set[str] = field(default_factory=set)

    @property
    def dims(self) -> dict[str, int]:
        """Batch key -> embedding dimension."""
        return {k: int(a.space(SPACES[k]).dim if isinstance(a, Store) else a.shape[1]) for k, a in self.arrays.items()}

    def nbytes(self) -> int:
        """Bytes of every space's rows in memory, as stored."""
        return sum(int(a.space(SPACES[k]).dim * np.dtype(a.space(SPACES[k]).dtype).itemsize * self.rows)
                   if isinstance(a, Store) else int(a.nbytes) for k, a in self.arrays.items())

    def read(self, key: str) -> np.ndarray:
        """The ``[rows, dim]`` rows of ``key`` in memory, every value finite (else a StoreError naming the row)."""
        src = self.arrays[key]
        arr = (np.concatenate([np.asarray(src.array(SPACES[key], i)) for i in range(len(src.shards))])
               if isinstance(src, Store) else np.asarray(src))
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1)) if arr.dtype.kind == "f" else []
        if len(bad):
            raise StoreError(f"row {int(bad[0])} of space {SPACES[key]!r} of {self.where} is NaN or infinite "
                             f"({len(bad)} such rows); re-embed those items")
        return arr


def _store_items(paths: str | Sequence[str], arg: str) -> StoredItems:
    """The items of the stores ``paths`` (one store, or several stores of the same items holding different
    spaces: e.g. ``old`` and ``side_info`` in the gallery's store, ``new`` in a later one)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise ValueError(f"{arg} is empty; give the folder of a store (fct-embed --store, fct-store import)")
    stores = [open_store(p) for p in paths]
    for other in stores[1:]:
        try:
            same_items(stores[0], other)
        except StoreError as err:
            raise StoreError(f"{arg}: the ids differ between the stores: {err}") from None
    arrays: dict[str, Store] = {}
    for key, space in SPACES.items():
        holding = [s for s in stores if space in s.spaces]
        if len(holding) > 1:
            raise StoreError(f"{arg}: space {space!r} is in {holding[0].path} and in {holding[1].path}; give each "
                             "space in one store only")
        if holding:
            arrays[key] = holding[0]
    missing = [SPACES[k] for k in NEEDED if k not in arrays]
    if missing:
        have = sorted({sp for s in stores for sp in s.spaces})
        raise StoreError(f"{arg} {', '.join(map(str, paths))} has no space {' or '.join(map(repr, missing))} (it has "
                         f"{have}); h is trained from the spaces 'old', 'side_info' (optional) and 'new' of the same "
                         "items: embed them (fct-embed --store) or import them (fct-store import --space new=FILE.npy)")
    with_labels = [s for s in stores if "label" in s.manifest.get("columns", {})]
    labels = (np.concatenate([with_labels[0].labels(i) for i in range(len(with_labels[0].shards))])
              if with_labels else None)
    digests = {k: s.space(SPACES[k]).checkpoint_digest for k, s in arrays.items()}
    datasets = {str(d) for k, s in arrays.items() if (d := s.space(SPACES[k]).provenance.get("dataset"))}
    return StoredItems(", ".join(str(s.path) for s in stores), stores[0].rows, dict(arrays), digests, labels, datasets)


def _array_items(arrays: Mapping[str, Any], labels: Any, arg: str) -> StoredItems:
    """The items of in-memory arrays, by batch key (``old``, ``new``, optionally ``side``)."""
    unknown = sorted(set(arrays) - set(SPACES))
    if unknown:
        raise ValueError(f"{arg}: unknown space(s) {unknown}; give 'old', 'new' and optionally 'side'")
    missing = [k for k in NEEDED if arrays.get(k) is None]
    if missing:
        raise ValueError(f"{arg}: the {' and '.join(missing)} embeddings are missing; h learns old (+ side) -> new")
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if value is None:
            continue
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if arr.ndim != 2 or arr.dtype.kind != "f" or 0 in arr.shape:
            raise ValueError(f"{arg}: {key} must be a [N, d] float array (one embedding per row), got a {arr.dtype} "
                             f"array of shape {list(arr.shape)}")
        out[key] = arr if arr.dtype in (np.float16, np.float32) else arr.astype(np.float32)
    rows = {k: len(a) for k, a in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{arg}: the arrays hold different numbers of items ({rows}); give one row per item in "
                         "each, in the same order")
    n = next(iter(rows.values()))
    if labels is not None:
        labels = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"{arg}: labels must be {n} integers (one per item), got a {labels.dtype} array of "
                             f"shape {list(labels.shape)}")
        labels = labels.astype(np.int64)
    return StoredItems(f"the {arg} arrays", n, dict(out), dict.fromkeys(out), labels)


class _Rows(Dataset):
    """Validation rows in memory, served a batch at a time (``__getitems__``: one gather per batch, not per item)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return {k: v[rows].float() if v.is_floating_point() else v[rows] for k, v in self.tensors.items()}


def _as_is(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The DataLoader's collate function: ``__getitems__`` already returns a batch."""
    return batch


class EmbeddingsDataModule(pl.LightningDataModule):
    """Stored embeddings of training and validation items, for the transformation stage (``--data embeddings``).

    Args:
        train: the store of the training items (or several stores of the same items, each holding some of the
            spaces): spaces ``old``, ``new`` and, for h with side-info, ``side_info``; labels (optional) are used
            only by FastFill's discriminative term.
        val: the store(s) of the validation items, with every space ``train`` has and with labels: each epoch the
            stage evaluates ``fct+side/old`` (new-model queries against the transformed gallery), ``old/old`` and
            ``new/new`` leave-one-out on them.
        dataset: the name h's checkpoint records as its dataset; None = the dataset the stores' spaces record
            (``fct-embed`` writes it), else ``embeddings``.
        batch_size: training rows per batch (per device).
        eval_batch_size: validation rows per batch; None = ``2 * batch_size``.
        seed: seeds each epoch's order of the training rows (a function of ``(seed, epoch)``, so a resumed run
            continues it).
        max_memory_gb: refuse training stores whose rows take more memory than this (see the module docstring).
    """

    def __init__(self, train: str | list[str], val: str | list[str], dataset: str | None = None,
                 batch_size: int = 1024, eval_batch_size: int | None = None, seed: int = 0,
                 max_memory_gb: float = 16.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        train_items = _store_items(train, "--data.train")
        self._init(train_items, _store_items(val, "--data.val"), dataset, batch_size, eval_batch_size, seed,
                   max_memory_gb)
        # record the name read from the stores, not None: loggers check these hparams against h's, which hold it
        self.save_hyperparameters({"dataset": self.name})

    @classmethod
    def from_arrays(cls, train: Mapping[str, Any], val: Mapping[str, Any] | None = None, train_labels: Any = None,
                    val_labels: Any = None, dataset: str | None = None, batch_size: int = 1024,
                    eval_batch_size: int | None = None, seed: int = 0,
                    max_memory_gb: float = 16.0) -> EmbeddingsDataModule:
        """The same datamodule over in-memory arrays: ``train`` / ``val`` map ``old``, ``new`` and optionally
        ``side`` to ``[N, d]`` float arrays of the same N items (numpy or torch); ``val_labels`` are required
        with ``val``."""
        self = cls.__new__(cls)
        pl.LightningDataModule.__init__(self)
        val_items = None if val is None else _array_items(val, val_labels, "val")
        self._init(_array_items(train, train_labels, "train"), val_items, dataset, batch_size, eval_batch_size, seed,
                   max_memory_gb)
        return self

    def _init(self, train: StoredItems, val: StoredItems | None, dataset: str | None, batch_size: int,
              eval_batch_size: int | None, seed: int, max_memory_gb: float) -> None:
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{arg}={value!r} is invalid; allowed: an integer >= 1")
        if train.nbytes() > max_memory_gb * 2**30:
            raise ValueError(f"the training rows of {train.where} take {train.nbytes() / 2**30:.1f} GB in memory, more "
                             f"than max_memory_gb={max_memory_gb}; they are read into memory whole: raise "
                             "--data.max_memory_gb if the host and device have room, or train on a subset")
        if val is not None:
            _check_val(train, val)
        self.train_items, self.val_items = train, val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.seed = seed
        recorded = sorted(train.datasets | (val.datasets if val is not None else set()))
        if dataset is None and len(recorded) > 1:
            raise ValueError(f"the stores' spaces were embedded from different datasets {recorded}; name the one h "
                             "is for with --data.dataset")
        self.name = dataset or (recorded[0] if recorded else "embeddings")
        self.train_batches: FeatureBatches | None = None
        self._val: _Rows | None = None

    # ------------------------------------------------------------------------------------------- what h sees
    @property
    def stored(self) -> dict[str, dict[str, Any]]:
        """By role (``old``, ``side_info``, ``new``): the dimension, the checkpoint digest and where the rows are
        (the transformation stage builds h from this, and records the digests in its checkpoint)."""
        dims = self.train_items.dims
        return {SPACES[k]: {"dim": dims[k], "digest": self.train_items.digests[k],
                            "source": f"{self.train_items.where} (space {SPACES[k]})"} for k in self.train_items.arrays}

    @property
    def class_names(self) -> None:
        """Stored items carry integer labels only (no class names to check against the frozen models)."""
        return None

    # ------------------------------------------------------------------------------------------- loaders
    def setup(self, stage: str | None = None) -> None:
        """Read the rows into memory: the training rows onto the trainer's device (this rank's share of every
        epoch is drawn from them), the validation rows into host memory."""
        if stage in (None, "fit") and self.train_batches is None:
            trainer = self.trainer
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            items = self.train_items
            features = {k: torch.from_numpy(np.ascontiguousarray(items.read(k))).unsqueeze(0) for k in items.arrays}
            labels = items.labels if items.labels is not None else np.full(items.rows, -1, np.int64)
            features["labels"] = torch.from_numpy(labels)
            self.train_batches = FeatureBatches(features, self.batch_size, device, self.seed, rank, world)
        if stage in (None, "fit", "validate") and self._val is None and self.val_items is not None:
            items = self.val_items
            tensors = {k: torch.from_numpy(np.ascontiguousarray(items.read(k))) for k in items.arrays}
            tensors.update(labels=torch.from_numpy(items.labels), index=torch.arange(items.rows))
            self._val = _Rows(tensors)

    def train_dataloader(self) -> FeatureBatches:
        """Batches ``{"old", "side", "new", "labels", "index"}`` of this rank's share, a new order every epoch
        (set by the transformation stage through ``set_epoch``)."""
        if self.train_batches is None:
            self.setup("fit")
        return self.train_batches

    def val_dataloader(self) -> Any:
        """The validation rows in order, ``{"old", "side", "new": [B, d] float32, "labels", "index"}`` batches."""
        if self.val_items is None:
            return []
        if self._val is None:
            self.setup("validate")
        return DataLoader(self._val, batch_size=self.eval_batch_size, collate_fn=_as_is)

    def __repr__(self) -> str:
        val = self.val_items.where if self.val_items is not None else None
        return f"EmbeddingsDataModule(train={self.train_items.where!r}, val={val!r}, dims={self.train_items.dims})"

    __str__ = __repr__


def _check_val(train: StoredItems, val: StoredItems) -> None:
    """The validation items must be embedded by the same models as the training items, and labelled."""
    for key in train.arrays:
        space = SPACES[key]
        if key not in val.arrays:
            raise StoreError(f"the validation items ({val.where}) have no space {space!r}, which the training items "
                             f"({train.where}) have; embed the validation items with the same models")
        if val.dims[key] != train.dims[key]:
            raise StoreError(f"dimension mismatch: space {space!r} is {train.dims[key]}-d for the training items "
                             f"({train.where}) but {val.dims[key]}-d for the validation items ({val.where}); they "
                             "were embedded by different models: embed both with the same one")
        a, b = train.digests[key], val.digests[key]
        if a and b and a != b:
            raise StoreError(f"space {space!r} of the training items ({train.where}) was embedded with checkpoint {a}, "
                             f"that of the validation items ({val.where}) with {b}; embed both with the same model")
    if val.labels is None:
        raise StoreError(f"the validation items ({val.where}) have no labels; validation scores retrieval by label: "
                         "give a store with labels (fct-store import --labels, fct-embed of a split) or val labels")


__all__ = ["EmbeddingsDataModule", "StoredItems"]
