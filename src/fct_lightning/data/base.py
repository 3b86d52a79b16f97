"""Base datamodule shared by every dataset: `(image, label, index)` items, class subsets, seeded views.

Every dataset is a :class:`RetrievalDataModule` subclass that knows its class names and how to load a split as
a *source* dataset (``source[i] -> (image tensor, label)`` with a ``targets`` attribute). The base wraps sources in
:class:`RetrievalDataset`, which

* restricts a split to a list of classes (labels keep their original class index; the item's ``index`` is its
  position within the restricted dataset, in the split's order);
* applies the transform (``views > 1`` gives ``[V, C, H, W]`` per item);
* optionally makes augmentation a deterministic function of ``(seed, epoch, item, view)``, independent of worker
  count and iteration order (``seed`` argument + :meth:`RetrievalDataset.set_epoch`), so that features cached
  from augmented images equal the ones computed on the fly.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fct_lightning.data.fingerprint import files_fingerprint
from fct_lightning.data.holdout import HOLDOUT, check_val_fraction, split_holdout
from fct_lightning.data.memory import InMemoryAugmentedLoader
from fct_lightning.data.recipes import Recipe, recipe_for
from fct_lightning.data.sampling import EpochShuffleSampler, mix_seed, single_item_tail
from fct_lightning.data.transforms import MultiView, build_transforms

log = logging.getLogger(__name__)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root``, else the ``FCT_DATA_ROOT`` environment variable, else ``data`` (relative to the working dir)."""
    if root is None:
        root = os.environ.get("FCT_DATA_ROOT") or "data"
    return Path(root).expanduser()


class TensorImages(Dataset):
    """A split held in memory: ``images[i] -> (image, label)``.

    Args:
        images: ``[N, C, H, W]`` uint8, or float in ``[0, 1]``.
        targets: ``[N]`` integer labels.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


class RetrievalDataset(Dataset):
    """``(image, label, index)`` items of a split, optionally restricted to some classes.

    Args:
        source: ``source[i] -> (image, label)``, with ``source.targets`` (all labels, in order).
        classes: keep only these class indices (None = all). ``index`` is the position in the kept subset.
        transform: image transform; a :class:`~fct_lightning.data.transforms.MultiView` gives ``[V, C, H, W]``.
        seed: None = ordinary randomness. Otherwise view ``v`` of source item ``i`` at epoch ``e`` is drawn
            with the torch RNG seeded by ``mix_seed(seed, e, i, v)`` (``i`` = position in the full split, so
            the augmentation of an item does not depend on the class subset). Set the epoch with
            :meth:`set_epoch`; it lives in shared memory, so persistent workers see it.
    """

    def __init__(
        self,
        source: Dataset,
        classes: Sequence[int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int | None = None,
    ) -> None:
        self.source = source
        targets = torch.as_tensor(source.targets, dtype=torch.long)
        if classes is None:
            self.positions = None
            self.targets = targets
        else:
            keep = torch.isin(targets, torch.as_tensor(list(classes), dtype=torch.long))
            self.positions = torch.nonzero(keep).flatten()
            self.targets = targets[self.positions]
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (seeded) augmentation is drawn; call before iterating."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.targets)

    def _augment(self, image: torch.Tensor, src: int) -> torch.Tensor:
        t = self.transform
        if t is None:
            return image
        if self.seed is None:
            return t(image)
        epoch = int(self._epoch)
        # seed only the CPU generator: torch.manual_seed would also queue a (slow) lazy CUDA seeding per item
        cpu_rng = torch.random.default_generator
        with torch.random.fork_rng(devices=[]):
            if isinstance(t, MultiView):
                out = []
                for v in range(t.views):
                    cpu_rng.manual_seed(mix_seed(self.seed, epoch, src, v))
                    out.append(t.transform(image))
                return torch.stack(out)
            cpu_rng.manual_seed(mix_seed(self.seed, epoch, src, 0))
            return t(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        src = int(self.positions[index]) if self.positions is not None else int(index)
        image, label = self.source[src]
        return self._augment(image, src), int(label), int(index)


def check_class_list(value: Any, num_classes: int, arg: str) -> list[int]:
    """Resolve ``None`` / int N / fraction f / list of ints to a sorted list of class indices, or raise ValueError.

    A fraction ``0 < f <= 1`` means the first ``floor(f * num_classes)`` classes (at least one): ``0.5`` is the
    first half of a dataset whose class count is not known in advance (e.g. the ``folder`` dataset).
    """
    if value is None:
        return list(range(num_classes))
    if isinstance(value, bool):  # the API promises ValueError for every bad argument value
        msg = f"{arg}={value!r}: expected None, an int in 1..{num_classes} or a list of class indices"
        raise ValueError(msg)  # noqa: TRY004
    if isinstance(value, numbers.Integral):
        if not 1 <= value <= num_classes:
            raise ValueError(f"{arg}={value} is out of range: an int must be in 1..{num_classes} (num_classes)")
        return list(range(value))
    if isinstance(value, numbers.Real):
        if not 0 < value <= 1:
            raise ValueError(f"{arg}={value}: a fraction of the classes must be in (0, 1], e.g. 0.5 for the first "
                             f"half; or give an int in 1..{num_classes} or a list of class indices")
        # floor of the decimal product: 0.29 * 100 is 28.999999999999996 in binary floating point, and means 29
        return list(range(max(1, math.floor(round(value * num_classes, 9)))))
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{arg}={value!r}: expected None, an int or a list of class indices") from None
    if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in items):
        raise ValueError(f"{arg}={value!r}: class indices must be integers")
    ids = [int(c) for c in items]
    if not ids:
        raise ValueError(f"{arg}=[]: give at least one class index in 0..{num_classes - 1}")
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{arg}={value!r}: class indices {bad} are out of range 0..{num_classes - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{arg}={value!r} contains duplicate class indices")
    return sorted(ids)


class RetrievalDataModule(pl.LightningDataModule):
    """Base datamodule: items are ``(image, label, index)``; see the module docstring.

    The arguments every dataset takes are declared here, once; a dataset class declares only its own (and a
    different default, e.g. ``eval_split``) and forwards ``**kwargs``. Subclasses set the class attributes, load
    splits in :meth:`_load_split` and may scan their classes in :meth:`_scan` (called in ``__init__``, before
    ``train_classes`` is checked).

    Args:
        root: data root: the dataset's folder, or a folder holding it as ``<name>/`` (see each dataset);
            None = ``$FCT_DATA_ROOT``, else ``data``. Unused by ``digits`` (the data ships with scikit-learn).
        batch_size: training batch size (per device).
        eval_batch_size: batch size of the evaluation loaders; None = ``2 * batch_size``.
        num_workers: DataLoader worker processes (the folder datasets decode images there: use several).
        train_classes: classes of the training split: None = all, int N = the first N class indices (in the
            dataset's documented order), a fraction f in (0, 1] = the first ``floor(f * num_classes)``, list =
            exactly those class indices. Labels keep their original class index.
        views: images per training item: 1, or V >= 2 contrastive views (a batch is then ``[B, V, C, H, W]``;
            the augmentation is then the family's strong, SimCLR-style recipe).
        eval_split: split used by the test/predict loaders, and by the val loader unless ``val_fraction`` is set
            (all classes); one of :attr:`splits`.
        val_fraction: share of each class's training images held out as the ``holdout`` split, which the val
            loader then serves (checkpoint selection and early stopping see no test item; the training split
            loses those items); 0 = validate on ``eval_split``. The same items for every seed
            (:mod:`fct_lightning.data.holdout`): give every stage of a chain the same value.
        augment: apply the family's training augmentation in ``train_dataloader`` (the recipes of
            :mod:`fct_lightning.data.recipes`: digits shifts, affine and noise; CIFAR pad-crop and flip;
            ImageNet-style RandomResizedCrop and flip); False = the evaluation transform.
        seed: seeds the training shuffle order, a function of ``(seed, epoch)`` so that ``--ckpt_path last``
            continues it (single process; under DDP Lightning's DistributedSampler shuffles), and the in-memory
            loader's augmentation. Per-item training augmentation uses ordinary randomness; use
            :meth:`eval_dataloader` with ``seed=`` for reproducible augmentation.
        pin_memory: DataLoader ``pin_memory``; None = True when CUDA is available.
        persistent_workers: keep workers alive between epochs (only used when ``num_workers > 0``).
        image_size: output image side; None = the dataset default (digits 8, CIFAR 32, folder datasets 224, whose
            evaluation resizes to ``image_size * 256 / 224`` first; digits and CIFAR resize other sizes), or, when
            the model being fitted loads pretrained weights, the side its backbone expects (its
            ``preferred_input``: timm's data config, torchvision's weights transforms).
        mean: per-channel normalisation mean (of images in ``[0, 1]``); None = the dataset's statistics, or those
            of the pretrained backbone being fitted (as ``image_size``).
        std: per-channel normalisation std, as ``mean``.
        in_memory_gpu: serve batches from one in-memory tensor with batched augmentation on the GPU when there is
            one (:class:`~fct_lightning.data.memory.InMemoryAugmentedLoader`): digits, CIFAR and small folder
            datasets (see :class:`~fct_lightning.data.folder.FolderDataModule` for the memory it takes).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    in_channels: ClassVar[int] = 3
    default_image_size: ClassVar[int] = 224
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()
    supports_in_memory: ClassVar[bool] = False
    num_classes: int  # set by every dataset (class attribute, or in _scan for folder datasets)
    class_names: list[str]  # index order

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_classes: int | float | list[int] | None = None,  # noqa: PYI041 (int = a count, float = a fraction)
        views: int = 1,
        eval_split: str = "test",
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_size: int | None = None,
        in_memory_gpu: bool = False,
        val_fraction: float = 0.0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = resolve_root(root)
        _check_int("batch_size", batch_size, 1)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("views", views, 1, "1 for single images, 2 (or more) for contrastive views")
        if image_size is not None:
            _check_int("image_size", image_size, 1)
        if in_memory_gpu and not self.supports_in_memory:
            raise ValueError(f"in_memory_gpu=True is not supported by the {self.name!r} datamodule "
                             "(datasets that support it: digits, cifar10, cifar100 and the folder datasets)")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.views = views
        self.augment = augment
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.image_size = image_size or self.default_image_size
        self._input_given = {"image_size": image_size is not None, "normalisation": mean is not None}
        if (mean is None) != (std is None):
            raise ValueError("give both --data.mean and --data.std (or neither, for the dataset's statistics)")
        if mean is not None and std is not None:
            if len(mean) != self.in_channels or len(std) != self.in_channels:
                raise ValueError(f"--data.mean {list(mean)} / --data.std {list(std)}: {self.name} images have "
                                 f"{self.in_channels} channel(s); give one value per channel")
            if not all(v > 0 for v in std):
                raise ValueError(f"--data.std {list(std)}: every value must be positive")
            self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.in_memory_gpu = in_memory_gpu
        self.val_fraction = check_val_fraction(val_fraction)
        self._sources: dict[str, Dataset] = {}
        self._raw: dict[str, Dataset] = {}
        self._fingerprints: dict[str, str | None] = {}
        self._scan()
        if eval_split not in self.splits:
            raise ValueError(f"eval_split={eval_split!r} is not a split of {self.name}; allowed: {self.splits}")
        self.eval_split = eval_split
        self.train_classes = train_classes
        self._train_class_ids = check_class_list(train_classes, self.num_classes, "train_classes")

    # ----- to override -------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        """Split names accepted by ``eval_split`` and :meth:`eval_dataloader`."""
        return ("train", "test")

    def _scan(self) -> None:
        """Cheap class discovery (e.g. listing class folders); sets ``num_classes``/``class_names`` if dynamic."""

    def _load_split(self, split: str) -> Dataset:
        """Load one split as a source dataset: ``source[i] -> (image, label)`` with ``source.targets``."""
        raise NotImplementedError

    # ----- data --------------------------------------------------------------------------------------
    @property
    def train_class_ids(self) -> list[int]:
        """Sorted class indices of the training split (resolved from ``train_classes``)."""
        return list(self._train_class_ids)

    @property
    def val_split(self) -> str:
        """The split the val loader serves: ``holdout`` with ``val_fraction``, else ``eval_split``."""
        return HOLDOUT if self.val_fraction else self.eval_split

    def held_out(self, split: str) -> bool:
        """Whether ``split`` is one side of the division by ``val_fraction`` (``train`` without, or ``holdout``)."""
        return bool(self.val_fraction) and split in ("train", HOLDOUT)

    def _raw_source(self, split: str) -> Dataset:
        if split not in self._raw:
            self._raw[split] = self._load_split(split)
        return self._raw[split]

    def source(self, split: str) -> Dataset:
        """The (cached) source dataset of ``split`` (with ``val_fraction``, ``train`` without the ``holdout``
        items)."""
        self.check_split(split)
        if split not in self._sources:
            if self.held_out(split):
                train, held = split_holdout(self._raw_source("train"), self.val_fraction, TensorImages)
                if len(held) == 0:
                    raise ValueError(
                        f"val_fraction={self.val_fraction:g} holds out no training image of {self.name}: no class has "
                        "two or more (one stays for training). Add training images, or validate on the evaluation "
                        f"split with --data.val_fraction 0.")
                self._sources.update({"train": train, HOLDOUT: held})
                if isinstance(train, TensorImages):  # two in-memory copies: drop the whole split (its key is kept)
                    self._files_key("train")
                    del self._raw["train"]
            else:
                self._sources[split] = self._raw_source(split)
        return self._sources[split]

    def content_key(self, split: str) -> str | None:
        """Fingerprint of the files behind ``split`` (:func:`files_fingerprint`), for caches derived from them;
        None for a split that is not read from image files (built-in arrays, pickles: fixed content). With
        ``val_fraction``, ``train`` and ``holdout`` also name the division (another fraction, another key)."""
        self.source(split)
        if self.held_out(split):
            return f"{self._files_key('train')}|{split} of val_fraction={self.val_fraction}"
        return self._files_key(split)

    def _files_key(self, split: str) -> str | None:
        if split in self._fingerprints:
            return self._fingerprints[split]
        src = self._raw_source(split)  # a split decoded into memory records its fingerprint while loading
        if split not in self._fingerprints:
            paths = getattr(src, "paths", None)
            if not paths:
                self._fingerprints[split] = None
            else:
                self.record_fingerprint(split, paths, getattr(self, "dataset_dir", None) or os.path.commonpath(paths))
        return self._fingerprints[split]

    def record_fingerprint(self, split: str, paths: Sequence[str], base: str | Path) -> str:
        """:func:`files_fingerprint` of ``split``'s files relative to ``base``, kept for :meth:`content_key`."""
        self._fingerprints[split] = fp = files_fingerprint(paths, base)
        return fp

    def follow_model(self, config: dict[str, Any] | None) -> None:
        """Serve the input a pretrained backbone expects (``config``: ``input_size`` as ``(C, H, W)``, ``mean``,
        ``std``), except what ``--data.image_size`` / ``--data.mean`` / ``--data.std`` set. Called by
        :meth:`setup` with the fitted model's ``preferred_input``, before any image is loaded."""
        if not config:
            return
        size, mean, std = config.get("input_size"), config.get("mean"), config.get("std")
        followed = []
        if size and not self._input_given["image_size"] and int(size[-1]) != self.image_size:
            self.image_size = int(size[-1])
            followed.append(f"image_size {self.image_size}")
        if (mean and std and len(mean) == self.in_channels and not self._input_given["normalisation"]
                and (tuple(mean), tuple(std)) != (tuple(self.mean), tuple(self.std))):
            self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            followed.append(f"mean {list(self.mean)}, std {list(self.std)}")
        if followed:
            log.info("%s: serving the pretrained backbone's input (%s); set --data.image_size / --data.mean / "
                     "--data.std to choose another", self.name, "; ".join(followed))

    def setup(self, stage: str | None = None) -> None:
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if not self._sources:  # before the first image is loaded: a pretrained backbone's input size
            self.follow_model(getattr(model, "preferred_input", None))
        needed = {"fit": ["train", self.val_split], "validate": [self.val_split]}.get(
            stage or "fit", [self.eval_split])
        for split in needed:
            self.source(split)

    def recipe(self, strong: bool = False) -> Recipe:
        """The dataset's training augmentation recipe (``strong``: the contrastive one of ``views >= 2``)."""
        return recipe_for(self.family, strong)

    def transform(self, train: bool, views: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
        """The dataset's transform (training augmentation or evaluation) for ``views`` views."""
        return build_transforms(self.family, train, views, self.image_size, self.mean, self.std)

    def dataset(
        self,
        split: str,
        classes: list[int] | None = None,
        augment: bool = False,
        views: int = 1,
        seed: int | None = None,
    ) -> RetrievalDataset:
        """A :class:`RetrievalDataset` of ``split`` (see :meth:`eval_dataloader` for the arguments)."""
        self.check_split(split)
        _check_int("views", views, 1, "1 for single images, 2 (or more) for contrastive views")
        ids = None if classes is None else check_class_list(classes, self.num_classes, "classes")
        transform = self.transform(augment, views) if augment else self.transform(False, 1)
        if views > 1 and not augment:
            transform = MultiView(transform, views)
        return RetrievalDataset(self.source(split), ids, transform, seed)

    # ----- loaders -----------------------------------------------------------------------------------
    def serve_training_batches(self, loader: Any) -> None:
        """From now on :meth:`train_dataloader` returns ``loader`` instead of the images: a stage that trains on
        something else made from them (the transformation stage's cached features) hands it over here, in its
        ``setup`` (Lightning asks for the training loader before ``on_fit_start``). None goes back to the images."""
        self._served = loader

    def train_dataloader(self) -> Any:
        """Training split restricted to :attr:`train_class_ids`, training augmentation, shuffled (or what a stage
        handed to :meth:`serve_training_batches`)."""
        if getattr(self, "_served", None) is not None:
            return self._served
        if self.in_memory_gpu:
            return self._memory_loader("train", self.train_class_ids, self.augment, self.views, True,
                                       self.batch_size, self.seed)
        ds = self.dataset("train", self.train_class_ids, self.augment, self.views)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 0, 1))
        world = self.trainer.world_size if self.trainer is not None else 1  # DistributedSampler: ceil(N / world)
        if world > 1 and self.num_workers == 0:
            # the training augmentation draws from this process's generator, which seed_everything seeds alike on
            # every rank: the k-th item of each rank would get the same crop. (Workers are seeded per rank.)
            torch.manual_seed(mix_seed(torch.initial_seed(), self.trainer.global_rank))
        return self._dataloader(ds, self.batch_size, sampler=EpochShuffleSampler(ds, self.seed, gen), generator=gen,
                                drop_last=single_item_tail(math.ceil(len(ds) / world), self.batch_size))

    def val_dataloader(self) -> Any:
        """:attr:`val_split` (the held-out training items, or the evaluation split), all classes, evaluation
        transform, in order."""
        return self.eval_dataloader(self.val_split)

    def test_dataloader(self) -> Any:
        return self.eval_dataloader(self.eval_split)

    def predict_dataloader(self) -> Any:
        return self.eval_dataloader(self.eval_split)

    def eval_dataloader(
        self,
        split: str,
        classes: list[int] | None = None,
        augment: bool = False,
        views: int = 1,
        seed: int | None = None,
        all_ranks: bool = False,
    ) -> Any:
        """An in-order loader over any split, e.g. to embed the training split for cached features.

        Args:
            split: one of :attr:`splits`.
            classes: class indices to keep (None = all).
            augment: training augmentation instead of the evaluation transform.
            views: views per item (``[B, V, C, H, W]`` batches when > 1).
            seed: None = ordinary randomness; an int makes the augmentation a function of
                ``(seed, epoch, item, view)``: call ``loader.dataset.set_epoch(e)`` (or ``loader.set_epoch(e)``
                for the in-memory loader) to pick the epoch.
            all_ranks: under DDP the in-memory loader gives each rank its own shard of the split (as Lightning's
                sampler does for the per-item loaders it manages); True = every rank gets the whole split, as from
                a per-item loader called directly.

        Returns:
            A DataLoader (or an :class:`~fct_lightning.data.memory.InMemoryAugmentedLoader` when
            ``in_memory_gpu``) yielding ``(images, labels, indices)`` with ``eval_batch_size``.
        """
        if self.in_memory_gpu:
            return self._memory_loader(split, classes, augment, views, False, self.eval_batch_size, seed,
                                       whole=all_ranks)
        ds = self.dataset(split, classes, augment, views, seed)
        return self._dataloader(ds, self.eval_batch_size)

    def _dataloader(self, ds: Dataset, batch_size: int, sampler: Any = None, generator: Any = None,
                    drop_last: bool = False) -> DataLoader:
        # no shuffle= keyword: Lightning reads a saved ``shuffle=False`` as "not shuffled" and would give DDP an
        # unshuffled DistributedSampler; it tells from the sampler's type (RandomSampler or not) instead
        order = {} if sampler is None else {"sampler": sampler}
        return DataLoader(
            ds,
            batch_size=batch_size,
            **order,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=generator,
        )

    def _memory_loader(self, split: str, classes: list[int] | None, augment: bool, views: int,
                       shuffle: bool, batch_size: int, seed: int | None, whole: bool = False) -> Any:
        self.check_split(split)
        ids = None if classes is None else check_class_list(classes, self.num_classes, "classes")
        src = self.source(split)
        if not isinstance(src, TensorImages):
            raise ValueError(  # noqa: TRY004
                f"in_memory_gpu=True needs the {split!r} split in memory; this one is lazily decoded "
                f"({type(src).__name__}, more than the in-memory limit of images)")
        return InMemoryAugmentedLoader(
            src.images, src.targets, batch_size, classes=ids, family=self.family, train=augment, views=views,
            image_size=self.image_size, mean=self.mean, std=self.std, shuffle=shuffle, seed=seed,
            drop_single_tail=shuffle,
            **({"rank": 0, "world_size": 1} if whole else {}),
        )

    def check_split(self, split: str) -> None:
        """Raise ValueError naming the allowed splits unless ``split`` is one (``holdout`` with ``val_fraction``)."""
        if split == HOLDOUT and self.val_fraction:
            return
        if split not in self.splits:
            hint = (f"; {HOLDOUT!r} exists only with val_fraction > 0 (--data.val_fraction 0.1)"
                    if split == HOLDOUT else "")
            raise ValueError(f"split={split!r} is not a split of {self.name}; allowed: {self.splits}{hint}")

    def __str__(self) -> str:  # LightningDataModule.__str__ builds every dataloader; keep printing cheap
        return repr(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, num_classes={self.num_classes}, "
                f"train_classes={len(self._train_class_ids)}, views={self.views}, eval_split={self.eval_split!r})")


def _check_int(arg: str, value: Any, minimum: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg}={value!r} is invalid; allowed: {allowed or f'an integer >= {minimum}'}")
