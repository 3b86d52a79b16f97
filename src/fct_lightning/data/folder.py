"""ImageFolder datasets: ImageNet-1k, Places-365, VGGFace2 (and the helpers the CIFAR folder layout uses).

Layout: ``<root>/<train_dir>/<class>/<image>`` and ``<root>/<eval_dir>/<class>/<image>`` (``.jpg``, ``.jpeg``,
``.png``, ``.bmp``, ``.webp``, ``.ppm``, ``.pgm``, ``.tif``, ``.tiff``, any case); ``root`` may also be the
directory that contains ``<name>/`` (e.g. ``data/`` holding ``data/imagenet/train/...``).

Class order (class index = position), fixed once from the training split's folder names in ``__init__``:

1. ``<dataset dir>/classes.txt`` (one folder name per line, in index order) when present; every class folder
   must be listed;
2. otherwise, if every folder name is an integer, numeric order (``"10"`` comes after ``"9"``);
3. otherwise sorted names (ImageNet wnids ``n01440764 ...`` in sorted order = the standard 1k index order;
   VGGFace2 ``n000002 ...``; Places-365 category folders).

Class folders of the evaluation split must be known classes; a class may be missing there. Files within a class
are sorted by name, classes are visited in index order, so item positions are stable. Images are decoded lazily
(:func:`torchvision.io.decode_image`, forced to RGB) in the DataLoader workers; with ``in_memory_gpu=True`` a split
is instead decoded once into one uint8 tensor and augmented in whole batches (small folders; see
:class:`FolderDataModule`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from fct_lightning.data.base import RetrievalDataModule, TensorImages, files_fingerprint
from fct_lightning.data.memory import center_offset
from fct_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def list_class_dirs(split_dir: Path) -> list[str]:
    """Names of the sub-directories of ``split_dir`` (hidden ones skipped), unsorted order not relied on."""
    with os.scandir(split_dir) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]


def order_classes(names: Sequence[str], classes_txt: Path | None = None) -> list[str]:
    """Class names in index order (see the module docstring for the rule)."""
    if classes_txt is not None and classes_txt.is_file():
        listed = [ln.strip() for ln in classes_txt.read_text().splitlines() if ln.strip()]
        if len(set(listed)) != len(listed):
            raise ValueError(f"{classes_txt} lists a class name twice")
        missing = sorted(set(names) - set(listed))
        if missing:
            raise ValueError(f"class folders {missing[:5]} are not listed in {classes_txt} "
                             f"({len(missing)} missing); add them or remove the file")
        return listed
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def list_images(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
    """All image paths of a split, class by class in index order, files sorted; with their labels."""
    present = list_class_dirs(split_dir)
    unknown = sorted(set(present) - set(class_to_idx))
    if unknown:
        raise ValueError(f"{split_dir} has class folders {unknown[:5]} that are not classes of the dataset "
                         f"(known: {list(class_to_idx)[:5]}...); check the layout or classes.txt")
    paths: list[str] = []
    targets: list[int] = []
    for name in sorted(present, key=class_to_idx.__getitem__):
        cdir = split_dir / name
        with os.scandir(cdir) as it:
            files = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += [str(cdir / f) for f in files]
        targets += [class_to_idx[name]] * len(files)
    return paths, targets


def load_image(path: str) -> torch.Tensor:
    """Decode one image file to a uint8 RGB tensor ``[3, H, W]``.

    Raises:
        ValueError: the file cannot be decoded (named in the message).
    """
    return _decode_named(path, read_file(path))


class ImageFiles(Dataset):
    """Lazily decoded image files: ``ds[i] -> (uint8 [3, H, W], label)``.

    Args:
        paths: image file paths.
        targets: labels, one per path.
    """

    def __init__(self, paths: list[str], targets: list[int]) -> None:
        self.paths = paths
        self.targets = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[i]), int(self.targets[i])


def square_for_eval(img: torch.Tensor, side: int, crop: int) -> torch.Tensor:
    """``img`` resized (shorter edge to ``side``, antialiased) and cut to a ``side x side`` square.

    The square is placed so that its ``crop`` centre crop is exactly the per-item evaluation transform's
    (``Resize(side)`` + ``CenterCrop(crop)``), pixel for pixel; it is within a pixel of the centred square.
    """
    img = TF.resize(img, [side], antialias=True)
    h, w = img.shape[-2:]
    inner = center_offset(side, crop)
    top = min(max(center_offset(h, crop) - inner, 0), h - side)
    left = min(max(center_offset(w, crop) - inner, 0), w - side)
    return img[:, top:top + side, left:left + side]


def decode_all(paths: list[str], size: int, cache_dir: Path | None = None, chunk: int = 1024,
               square_for: int | None = None, fingerprint: str | None = None) -> torch.Tensor:
    """Decode every image into one uint8 tensor ``[N, 3, size, size]``, optionally cached as ``.npy``.

    Args:
        paths: image files.
        size: side of the stored images.
        cache_dir: where the ``.npy`` cache lives (None = no cache). Its file name is keyed by the files
            (:func:`~fct_lightning.data.base.files_fingerprint` relative to ``cache_dir``'s parent: paths, sizes,
            modification times), ``size`` and ``square_for``, so a changed tree is decoded again. A cache that
            cannot be written (read-only root) is skipped with a warning.
        chunk: files read per batch.
        square_for: None = every image must already be ``size x size``; an int ``c`` = images of any shape
            are stored as :func:`square_for_eval` squares whose ``c`` centre crop is the evaluation view.
        fingerprint: the files' fingerprint relative to ``cache_dir``'s parent, when the caller has it.

    Raises:
        ValueError: an image is not ``size x size`` (``square_for`` None), or a file cannot be decoded.
    """
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha1((f"{size}" if square_for is None else f"{size}/{square_for}").encode())
        h.update((fingerprint or files_fingerprint(paths, cache_dir.parent)).encode())
        cache_file = cache_dir / f"decoded-{len(paths)}-{h.hexdigest()[:20]}.npy"
        if cache_file.is_file():
            try:
                arr = np.load(cache_file)
            except (OSError, ValueError, EOFError) as err:  # empty, truncated or foreign: decode again, overwrite
                log.warning("ignoring the unreadable decoded-image cache %s (%s)", cache_file, err)
                arr = None
            if arr is not None and arr.shape == (len(paths), 3, size, size) and arr.dtype == np.uint8:
                return torch.from_numpy(arr)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for start in range(0, len(paths), chunk):
        batch = paths[start:start + chunk]
        datas = [read_file(p) for p in batch]
        imgs = None
        if all(p.lower().endswith((".jpg", ".jpeg")) for p in batch):
            with contextlib.suppress(RuntimeError):  # a bad file: decode one by one below, to name it
                imgs = decode_jpeg(datas, mode=ImageReadMode.RGB)
        if imgs is None:  # per file: Pillow formats, 16-bit PNGs and unreadable files are handled there
            imgs = [_decode_named(p, d) for p, d in zip(batch, datas, strict=True)]
        for j, img in enumerate(imgs):
            if square_for is not None:
                img = square_for_eval(img, size, square_for)
            elif img.shape[1:] != (size, size):
                raise ValueError(f"{batch[j]} is {tuple(img.shape[1:])} pixels; this dataset expects "
                                 f"{size}x{size} images")
            out[start + j] = img
    if cache_file is not None:
        _save_npy(cache_file, out.numpy())
    return out


def _as_uint8(img: torch.Tensor) -> torch.Tensor:
    """8 bits per channel: 16-bit PNGs decode to uint16, which would wrap around when stored as uint8."""
    return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)


def _decode_named(path: str, data: torch.Tensor) -> torch.Tensor:
    """torchvision's decoder (JPEG, PNG, WebP, GIF), else Pillow (BMP, PPM/PGM, TIFF); a clear error otherwise."""
    try:
        return _as_uint8(decode_image(data, mode=ImageReadMode.RGB))
    except RuntimeError as err:
        first = err
    try:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode the image file {path} ({str(first).splitlines()[-1]}; Pillow: {err}); "
                         f"remove or replace it") from err


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the decoded-image cache %s (%s); continuing without it", path, err)
        tmp.unlink(missing_ok=True)


def find_dataset_dir(root: Path, name: str, train_dir: str) -> Path | None:
    """``root`` or ``root/<name>``, whichever holds ``<train_dir>/``."""
    for cand in (root, root / name):
        if (cand / train_dir).is_dir():
            return cand
    return None


class FolderDataModule(RetrievalDataModule):
    """Base of the ImageFolder datamodules (224 px transforms, ImageNet mean/std, lazy decoding).

    Args:
        root: data root holding ``<train_dir>/`` and ``<eval_dir>/`` (or ``<name>/<train_dir>/``...);
            None = ``$FCT_DATA_ROOT``, else ``data``.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size; None = ``2 * batch_size``.
        num_workers: DataLoader workers (decoding happens there: use several).
        train_classes: None = all, int N = the first N class indices, fraction f in (0, 1] = the first
            ``floor(f * num_classes)``, list = those class indices.
        views: 1, or V >= 2 contrastive views.
        eval_split: the evaluation split name (``"train"`` or the dataset's evaluation split).
        augment: training augmentation (RandomResizedCrop + flip).
        seed: training shuffle seed.
        pin_memory: None = when CUDA is available.
        persistent_workers: keep workers between epochs when ``num_workers > 0``.
        image_size: crop size (default 224; evaluation resizes to ``image_size * 256 / 224`` first).
        train_dir: training split folder under the dataset directory.
        eval_dir: evaluation split folder under the dataset directory.
        in_memory_gpu: decode every image of a split once into one uint8 tensor of squares of side
            ``round(image_size * 256 / 224)`` (the evaluation resize), held on the GPU when there is one, and
            augment whole batches there (:mod:`fct_lightning.data.memory`): no worker processes, no decoding per
            epoch. For folders of up to some 10^5 small images; evaluation gives the same pixels as the per-item
            path, training crops come from the stored square.
        cache_decoded: with ``in_memory_gpu``, cache the decoded split as ``.npy`` under
            ``<dataset dir>/.cache`` (keyed by the file list and sizes; a read-only tree skips it).
        in_memory_max_gb: with ``in_memory_gpu``, refuse a split whose decoded tensor would be larger (GiB).
    """

    family = "imagenet"
    in_channels = 3
    default_image_size = 224
    supports_in_memory = True
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    default_eval_split = "val"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_classes: int | float | list[int] | None = None,  # noqa: PYI041 (int = a count, float = a fraction)
        views: int = 1,
        eval_split: str = "val",
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_size: int | None = None,
        train_dir: str = "train",
        eval_dir: str = "val",
        in_memory_gpu: bool = False,
        cache_decoded: bool = True,
        in_memory_max_gb: float = 16.0,
    ) -> None:
        self.train_dir = train_dir
        self.eval_dir = eval_dir
        self.cache_decoded = cache_decoded
        if isinstance(in_memory_max_gb, bool) or not isinstance(in_memory_max_gb, int | float) \
                or not in_memory_max_gb > 0:
            raise ValueError(f"in_memory_max_gb={in_memory_max_gb!r} is invalid; allowed: a number of GiB > 0")
        self.in_memory_max_gb = float(in_memory_max_gb)
        super().__init__(
            root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            train_classes=train_classes, views=views, eval_split=eval_split, augment=augment, seed=seed,
            pin_memory=pin_memory, persistent_workers=persistent_workers, image_size=image_size,
            in_memory_gpu=in_memory_gpu,
        )

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
        paths, targets = list_images(self._split_dir(split), {n: i for i, n in enumerate(self.class_names)})
        if not paths:
            raise FileNotFoundError(f"{self.name}: no images in {self._split_dir(split)}; {self.layout_help()}")
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
        self._fingerprints[split] = fp = files_fingerprint(paths, self.dataset_dir)
        log.info("%s: decoding the %r split (%d images) to %d px squares in memory", self.name, split,
                 len(paths), side)
        return TensorImages(decode_all(paths, side, cache, square_for=self.image_size, fingerprint=fp),
                            torch.as_tensor(targets))




class ImageNetDataModule(FolderDataModule):
    """ImageNet-1k: ``<root>/train/<class>/...`` and ``<root>/val/<class>/...``; evaluation split ``"val"``.

    Args: as :class:`FolderDataModule`, with ``eval_split="val"``, ``train_dir="train"``, ``eval_dir="val"``.
    """

    name = "imagenet"
    default_eval_split = "val"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_classes: int | float | list[int] | None = None,  # noqa: PYI041 (int = a count, float = a fraction)
        views: int = 1,
        eval_split: str = "val",
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_size: int | None = None,
        train_dir: str = "train",
        eval_dir: str = "val",
        in_memory_gpu: bool = False,
        cache_decoded: bool = True,
        in_memory_max_gb: float = 16.0,
    ) -> None:
        super().__init__(
            root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            train_classes=train_classes, views=views, eval_split=eval_split, augment=augment, seed=seed,
            pin_memory=pin_memory, persistent_workers=persistent_workers, image_size=image_size,
            train_dir=train_dir, eval_dir=eval_dir, in_memory_gpu=in_memory_gpu, cache_decoded=cache_decoded,
            in_memory_max_gb=in_memory_max_gb,
        )


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

    Args: as :class:`FolderDataModule`, with ``eval_split="test"``, ``train_dir="train"``, ``eval_dir="test"``.
    """

    name = "vggface2"
    default_eval_split = "test"

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
        train_dir: str = "train",
        eval_dir: str = "test",
        in_memory_gpu: bool = False,
        cache_decoded: bool = True,
        in_memory_max_gb: float = 16.0,
    ) -> None:
        super().__init__(
            root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            train_classes=train_classes, views=views, eval_split=eval_split, augment=augment, seed=seed,
            pin_memory=pin_memory, persistent_workers=persistent_workers, image_size=image_size,
            train_dir=train_dir, eval_dir=eval_dir, in_memory_gpu=in_memory_gpu, cache_decoded=cache_decoded,
            in_memory_max_gb=in_memory_max_gb,
        )
