"""What ``fct-embed --store`` embeds: the items of a store (a folder of image files, or a dataset split), the one
evaluation view every model of the pass reads them with, and the batches of a rank's shards.

Items: the sorted image files below a folder (id = the path relative to it, no labels), or a split in its item
order (id = ``"<split>/<index>"``, its labels). Batches never cross a shard and cut each shard the same way in every
run and on every rank, so a shard's bytes do not depend on how many processes wrote the store or how often the job
was interrupted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from fct_lightning.data import DATAMODULES
from fct_lightning.gallery.embed import NATIVE_SIZE, image_view, list_images, view_input
from fct_lightning.models.inputs import InputSpec
from fct_lightning.store import Shard, Store

log = logging.getLogger(__name__)


class FolderItems:
    """The image files below ``folder``, read as models of ``dataset`` read them (``settings``: its image size).

    Args:
        folder: the gallery (or query) images, searched recursively.
        dataset: the dataset the models were trained on (its family, normalisation and default size).
        settings: the models' data settings (``image_size``).
    """

    labels = None

    def __init__(self, folder: str | Path, dataset: str, settings: dict[str, Any]) -> None:
        self.folder, self.settings = Path(folder), settings
        cls, self.size, self.transform = image_view(dataset, settings)
        self.family = cls.family
        self.view = {"family": cls.family, "image_size": self.size, "mean": list(cls.mean or ()),
                     "std": list(cls.std or ())}
        self.source = {"images": str(self.folder.resolve()), "image_size": self.size}
        self.input = view_input(dataset, self.size)  # what is served
        self.paths: list[str] = []

    def describe(self) -> str:
        return f"{self.family} images at {self.size} px (mean {self.view['mean']}, std {self.view['std']})"

    def ids(self) -> list[str]:
        """The ids of every image file below the folder (relative paths, sorted as the files are)."""
        self.paths, _ = list_images(self.folder)
        return [os.path.relpath(p, self.folder) for p in self.paths]

    def unreadable(self, rows: Sequence[int], num_workers: int) -> dict[int, str]:
        """Decode the files ``rows`` (positions in :meth:`ids`): ``{row: why}`` for those that cannot be decoded."""
        loader = DataLoader(Subset(_Decodes(self.paths, self.family), list(rows)), batch_size=32,
                            num_workers=num_workers, collate_fn=list)
        bad = {}
        for part in loader:
            bad.update({row: why for row, why in part if why})
        return bad

    def dataset(self, store: Store) -> Dataset:
        """Store row -> evaluation view of its image (the path is ``folder / id``, read from the store)."""
        return _StoreFiles(self.folder, store, self.transform, self.family)


class WrongSize(ValueError):
    """An image that decodes, at a size its model family cannot read (CIFAR-family models read 32x32 only)."""


def read_image(path: str, family: str) -> Tensor:
    """The uint8 ``[3, H, W]`` image of ``path``; ValueError/OSError when it cannot be decoded, WrongSize when
    the family reads only one size and this is another."""
    from fct_lightning.data.folder import load_image

    img = load_image(path)
    native = NATIVE_SIZE.get(family)
    if native is not None and tuple(img.shape[-2:]) != (native, native):
        raise WrongSize(f"{path} is {tuple(img.shape[-2:])} pixels; this {family}-family model reads "
                        f"{native}x{native} images, as it was trained: resize the gallery's images first")
    return img


class _Decodes(Dataset):
    """Position -> ``(position, "")`` when the file decodes, else ``(position, why)``."""

    def __init__(self, paths: list[str], family: str) -> None:
        self.paths, self.family = paths, family

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            read_image(self.paths[i], self.family)
        except WrongSize:
            raise
        except (ValueError, OSError) as err:
            return i, str(err)
        return i, ""


class _StoreFiles(Dataset):
    """Store row -> evaluation view of ``folder / id``; each worker reads the ids of one shard at a time."""

    def __init__(self, folder: Path, store: Store, transform: Callable[[Tensor], Tensor], family: str) -> None:
        self.folder, self.store, self.transform, self.family = folder, store, transform, family
        self._shard: Shard | None = None
        self._paths: list[str] = []

    def __len__(self) -> int:
        return self.store.rows

    def __getitem__(self, row: int) -> Tensor:
        shard = self.store.shard(row // self.store.shard_rows)
        if shard != self._shard:
            self._shard, self._paths = shard, [str(self.folder / i) for i in self.store.ids(shard.index)]
        path = self._paths[row - shard.start]
        try:
            return self.transform(read_image(path, self.family))
        except WrongSize:
            raise
        except (ValueError, OSError) as err:
            raise ValueError(f"{err} (row {row} of the store {self.store.path}, checked when the store was created; "
                             "its items are fixed: restore the file and run the same command again, complete "
                             "shards are kept)") from err


class SplitItems:
    """A split of ``dataset`` (default: its evaluation split) with the models' data ``settings``."""

    def __init__(self, dataset: str, settings: dict[str, Any], split: str | None) -> None:
        self.dm, self.settings = DATAMODULES[dataset](**settings), settings
        self.input = InputSpec.of(self.dm)  # what is served
        self.split = split or self.dm.eval_split
        self.dm.check_split(self.split)
        root = {} if self.dm.family == "digits" else {"root": str(Path(self.dm.root).resolve())}  # built in: no root
        # with a held-out share, "train" and "holdout" are that division of the training images (the run's items)
        held = {"val_fraction": self.dm.val_fraction} if self.dm.held_out(self.split) else {}
        self.view = {"dataset": dataset, "split": self.split, **root, "image_size": self.dm.image_size, **held,
                     **{k: settings[k] for k in ("train_dir", "eval_dir") if settings.get(k) is not None}}
        self.source = dict(self.view)
        self.labels: np.ndarray | None = None

    def describe(self) -> str:
        where = f" at {self.view['root']}" if "root" in self.view else ""
        return f"split {self.split!r} of {self.view['dataset']}{where}, {self.dm.image_size} px"

    def ids(self) -> list[str]:
        """``"<split>/<index>"`` for every item of the split, in its order (and :attr:`labels`)."""
        targets = self.dm.dataset(self.split).targets
        self.labels = torch.as_tensor(targets).numpy().astype(np.int64)
        return [f"{self.split}/{i}" for i in range(len(targets))]

    def dataset(self, store: Store) -> Dataset:
        """Store row (= position in the split) -> evaluation view of the item."""
        return _Images(self.dm.dataset(self.split))


class _Images(Dataset):
    def __init__(self, items: Dataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> Tensor:
        return self.items[row][0]


class ShardBatches(Dataset):
    """Batch ``k`` of some shards: ``(images [B, ...], store rows [B] int64)``, whole batches per worker.

    Each shard is cut into ``batch_size`` rows from its first row on (the last batch of a shard is smaller), so the
    same rows always meet in the same batch.
    """

    def __init__(self, images: Dataset, shards: Sequence[Shard], batch_size: int) -> None:
        self.images = images
        self.spans = [(a, min(a + batch_size, s.stop)) for s in shards for a in range(s.start, s.stop, batch_size)]

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        a, b = self.spans[k]
        return torch.stack([self.images[i] for i in range(a, b)]), torch.arange(a, b, dtype=torch.int64)


def shard_loader(images: Dataset, shards: Sequence[Shard], batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The loader of :class:`ShardBatches` (the batches are made in the workers: ``batch_size=None``)."""
    return DataLoader(ShardBatches(images, shards, batch_size), batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory)


def common_view(views: dict[str, tuple[dict[str, Any], str]]) -> None:
    """Nothing when every checkpoint (path -> ``(view, description)``) reads the items the same way; else an error
    naming which read them how, and the fix (one run per view, into the same store)."""
    distinct = {repr(sorted(v.items())) for v, _ in views.values()}
    if len(distinct) > 1:
        lines = "; ".join(f"{path}: {text}" for path, (_, text) in views.items())
        raise ValueError(
            f"the checkpoints read the images differently ({lines}). One pass decodes each image once for all "
            "models, so their evaluation views must agree: run fct-embed once per group of checkpoints that "
            "agree, with the same --store (the items are the same, so their spaces join one store)")
