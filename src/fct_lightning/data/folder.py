"""ImageFolder datasets: ImageNet-1k, Places-365, VGGFace2 and your own images (``folder``).

Layout: ``<root>/<train_dir>/<class>/<image>`` and ``<root>/<eval_dir>/<class>/<image>`` (``.jpg``, ``.jpeg``,
``.jfif``, ``.png``, ``.bmp``, ``.webp``, ``.gif``, ``.ppm``, ``.pgm``, ``.tif``, ``.tiff``, any case); ``root``
may also be the directory that contains ``<name>/`` (e.g. ``data/`` holding ``data/imagenet/train/...``), which is
preferred when both hold ``<train_dir>/`` (see :func:`~fct_lightning.data.image_tree.find_dataset_dir`).

A class folder is searched recursively, as torchvision's ``ImageFolder`` does: images in its sub-folders (e.g.
``train/<class>/batch1/*.jpg``) belong to the class, symlinked files and folders are followed (a symlink back to a
folder above it is not walked twice). Hidden files and folders (names starting with ``.``, e.g. macOS ``._*.jpg``
and ``.DS_Store``) are skipped. Broken symlinks and files of image formats that are not read here (HEIC, AVIF, ...)
are skipped with a warning naming a few. Every class folder of the training split must hold an image.

Class order (class index = position), fixed once from the training split's folder names in ``__init__``:

1. ``<dataset dir>/classes.txt`` (one folder name per line, in index order, UTF-8 with or without a BOM) when
   present; every class folder must be listed;
2. otherwise, if every folder name is a decimal integer, numeric order (``"10"`` comes after ``"9"``; ``"01"``
   after ``"1"``);
3. otherwise sorted names (ImageNet wnids ``n01440764 ...`` in sorted order = the standard 1k index order;
   VGGFace2 ``n000002 ...``; Places-365 category folders).

Class names are compared in Unicode NFC form (``class_names`` holds them so), so a split copied by macOS (NFD
names) still matches. Class folders of the evaluation split must be known classes; a class may be missing there.
Files within a class are sorted by their path below the class folder, classes are visited in index order, so item
positions are stable. Images are decoded lazily (:func:`torchvision.io.decode_image`, forced to RGB, EXIF
orientation applied) in the DataLoader workers; with ``in_memory_gpu=True`` a split is instead decoded once into
one uint8 tensor and augmented in whole batches (small folders; see :class:`FolderDataModule`). Listing the images
lives in :mod:`fct_lightning.data.image_tree`, decoding and its cache in :mod:`fct_lightning.data.decode`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fct_lightning.data.base import RetrievalDataModule, TensorImages
from fct_lightning.data.decode import ImageFiles, decode_all, load_image, split_tag
from fct_lightning.data.image_tree import (
    IMG_EXTENSIONS,
    find_dataset_dir,
    find_images,
    list_class_dirs,
    list_images,
    order_classes,
)
from fct_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

class FolderDataModule(RetrievalDataModule):
    """Base of the ImageFolder datamodules (224 px transforms, ImageNet mean/std, lazy decoding).

    ``root`` holds ``<name>/<train_dir>/`` and ``<name>/<eval_dir>/`` (preferred), or ``<train_dir>/`` and
    ``<eval_dir>/`` itself (see :func:`~fct_lightning.data.image_tree.find_dataset_dir`). With ``in_memory_gpu``
    every image of a split is decoded once into one uint8 tensor of squares of side ``round(image_size * 256 /
    224)`` (the evaluation resize), held on the GPU when there is one, and whole batches are augmented there
    (:mod:`fct_lightning.data.memory`): no worker processes, no decoding per epoch. For folders of up to some 10^5
    small images; evaluation gives the same pixels as the per-item path, training crops come from the stored
    square.

    Args:
        eval_split: the evaluation split name (``"train"`` or the dataset's evaluation split).
        train_dir: training split folder under the dataset directory.
        eval_dir: evaluation split folder under the dataset directory.
        cache_decoded: with ``in_memory_gpu``, cache the decoded split as ``.npy`` under
            ``<dataset dir>/.cache`` (keyed by the file list and sizes; a read-only tree skips it).
        in_memory_max_gb: with ``in_memory_gpu``, refuse a split whose decoded tensor would be larger (GiB).
        **kwargs: the arguments of :class:`~fct_lightning.data.base.RetrievalDataModule`.
    """

    family = "imagenet"
    in_channels = 3
    default_image_size = 224
    supports_in_memory = True
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    default_eval_split = "val"

    def __init__(self, *, eval_split: str = "val", train_dir: str = "train", eval_dir: str = "val",
                 cache_decoded: bool = True, in_memory_max_gb: float = 16.0, **kwargs: Any) -> None:
        self.train_dir = train_dir
        self.eval_dir = eval_dir
        self.cache_decoded = cache_decoded
        if isinstance(in_memory_max_gb, bool) or not isinstance(in_memory_max_gb, int | float) \
                or not in_memory_max_gb > 0:
            raise ValueError(f"in_memory_max_gb={in_memory_max_gb!r} is invalid; allowed: a number of GiB > 0")
        self.in_memory_max_gb = float(in_memory_max_gb)
        super().__init__(eval_split=eval_split, **kwargs)

    @property
    def splits(self) -> tuple[str, ...]:
        """``train``, the evaluation split, and every other folder next to them (e.g. ``query/`` and ``gallery/``
        for evaluation with separate query and gallery sets: ``fct-eval --query_split query --gallery_split
        gallery``)."""
        return ("train", self.default_eval_split, *getattr(self, "_other_splits", ()))

    def layout_help(self) -> str:
        r = self.root
        return (f"expected an ImageFolder tree {r}/{self.train_dir}/<class>/*.jpg and "
                f"{r}/{self.eval_dir}/<class>/*.jpg (or the same under {r}/{self.name}/); "
                f"set --data.root (or $FCT_DATA_ROOT), --data.train_dir and --data.eval_dir")

    def _scan(self) -> None:
        found = find_dataset_dir(self.root, self.name, self.train_dir)
        if found is None:
            raise FileNotFoundError(f"{self.name}: data not found: {self.layout_help()}")
        names = list_class_dirs(found / self.train_dir)
        if not names:
            raise FileNotFoundError(f"{self.name}: {found / self.train_dir} has no class folders; "
                                    f"{self.layout_help()}")
        self.dataset_dir = found
        # the other folders next to the two splits, listed once here (``splits`` is read on every split access)
        named = {self.train_dir, self.eval_dir, "train", self.default_eval_split}
        self._other_splits = tuple(sorted(d.name for d in found.iterdir()
                                          if d.is_dir() and not d.name.startswith(".") and d.name not in named))
        self.class_names = order_classes(names, found / "classes.txt")
        self.num_classes = len(self.class_names)

    def prepare_data(self) -> None:
        """With ``in_memory_gpu`` and ``cache_decoded``, decode the training and evaluation splits here.

        Lightning calls this on one process per node before ``setup`` and makes the other ranks wait, so a split
        is decoded once per node; the other ranks then read the ``.npy`` cache instead of decoding it too.
        """
        if self.in_memory_gpu and self.cache_decoded:
            for split in ("train", self.eval_split):
                self.source(split)

    def _split_dir(self, split: str) -> Path:
        folder = {"train": self.train_dir, self.default_eval_split: self.eval_dir}.get(split, split)
        d = self.dataset_dir / folder
        if not d.is_dir():
            raise FileNotFoundError(f"{self.name}: split folder {d} is missing; {self.layout_help()}")
        return d

    def _load_split(self, split: str) -> Dataset:
        split_dir = self._split_dir(split)
        paths, targets = list_images(split_dir, {n: i for i, n in enumerate(self.class_names)},
                                     require_images=split == "train")
        if not paths:
            raise FileNotFoundError(f"{self.name}: no images in {split_dir}; {self.layout_help()}")
        if not self.in_memory_gpu:
            return ImageFiles(paths, targets)
        side = round(self.image_size * 256 / 224)
        gib = len(paths) * 3 * side * side / 2**30
        if gib > self.in_memory_max_gb:
            raise ValueError(
                f"{self.name}: in_memory_gpu=True would hold the {split!r} split ({len(paths)} images as "
                f"{side}x{side} squares) in {gib:.1f} GiB, more than in_memory_max_gb={self.in_memory_max_gb:g}; "
                f"set --data.in_memory_gpu false (per-item decoding in --data.num_workers workers), a smaller "
                f"--data.image_size, or raise --data.in_memory_max_gb if the memory is there")
        cache = self.dataset_dir / ".cache" if self.cache_decoded else None
        fp = self.record_fingerprint(split, paths, self.dataset_dir)
        log.info("%s: decoding the %r split (%d images) to %d px squares in memory", self.name, split,
                 len(paths), side)
        return TensorImages(decode_all(paths, side, cache, square_for=self.image_size, fingerprint=fp,
                                       cache_tag=split_tag(split_dir, self.dataset_dir)),
                            torch.as_tensor(targets))


class ImageNetDataModule(FolderDataModule):
    """ImageNet-1k: ``<root>/train/<class>/...`` and ``<root>/val/<class>/...``; evaluation split ``"val"``.

    The arguments of :class:`FolderDataModule` (``eval_split="val"``, ``train_dir="train"``, ``eval_dir="val"``).
    """

    name = "imagenet"
    default_eval_split = "val"


class ImageFolderDataModule(ImageNetDataModule):
    """Your own images: ``<root>/train/<class>/...`` and ``<root>/val/<class>/...`` (other split folder names via
    ``train_dir`` / ``eval_dir``); evaluation split ``"val"``.

    The class count is whatever the training folder holds, so the shipped configs (``configs/folder``) give
    ``train_classes`` as a fraction (``0.5``: the old model sees the first half of the classes, in sorted folder
    order or the order of ``<root>/classes.txt``). Same arguments as :class:`ImageNetDataModule`.
    """

    name = "folder"


class Places365DataModule(ImageNetDataModule):
    """Places-365: ``<root>/train/<class>/...`` and ``<root>/val/<class>/...``; evaluation split ``"val"``.

    The same layout, splits and arguments as :class:`ImageNetDataModule` (its signature is inherited).
    """

    name = "places365"


class VGGFace2DataModule(FolderDataModule):
    """VGGFace2: ``<root>/train/<class>/...`` and ``<root>/test/<class>/...``; evaluation split ``"test"``.

    Args:
        eval_split: the evaluation split name (``"test"``, or ``"train"``).
        eval_dir: evaluation split folder under the dataset directory.
        **kwargs: the other arguments of :class:`FolderDataModule`.
    """

    name = "vggface2"
    default_eval_split = "test"

    def __init__(self, *, eval_split: str = "test", eval_dir: str = "test", **kwargs: Any) -> None:
        super().__init__(eval_split=eval_split, eval_dir=eval_dir, **kwargs)


# re-exported for callers that import them from here (the gallery commands): they live in image_tree and decode
__all__ = ["IMG_EXTENSIONS", "FolderDataModule", "ImageFolderDataModule", "ImageNetDataModule", "Places365DataModule",
           "VGGFace2DataModule", "find_images", "load_image", "order_classes"]
