"""ImageFolder datasets: ImageNet-1k, Places-365, VGGFace2 (and the helpers the CIFAR folder layout uses).

Layout: ``<root>/<train_dir>/<class>/<image>`` and ``<root>/<eval_dir>/<class>/<image>`` (``.jpg``, ``.jpeg``,
``.jfif``, ``.png``, ``.bmp``, ``.webp``, ``.gif``, ``.ppm``, ``.pgm``, ``.tif``, ``.tiff``, any case); ``root``
may also be the directory that contains ``<name>/`` (e.g. ``data/`` holding ``data/imagenet/train/...``), which is
preferred when both hold ``<train_dir>/`` (see :func:`find_dataset_dir`).

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
one uint8 tensor and augmented in whole batches (small folders; see :class:`FolderDataModule`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fct_lightning.data.base import RetrievalDataModule, TensorImages, files_fingerprint
from fct_lightning.data.memory import center_offset
from fct_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jfif")
OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jpe", ".pbm", ".pnm", ".ico", ".tga",
                          ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw", ".raw", ".exr", ".hdr", ".dcm")
"""Image formats that are not read: such files in a class folder are reported (skipped) rather than ignored."""

DECODER_VERSION = 2
"""Part of the decoded-image cache key; raise it whenever a change makes decoded pixels differ (2: EXIF orientation,
16-bit / 32-bit / float images read through Pillow scaled instead of clipped)."""

STALE_TMP_S = 3600.0
"""A cache ``*.tmp`` file not written to for this long belongs to a writer that died: it is removed."""


def nfc(name: str) -> str:
    """``name`` in Unicode normal form C (how class names are compared)."""
    return unicodedata.normalize("NFC", name)


def list_class_dirs(split_dir: Path) -> list[str]:
    """Names of the sub-directories of ``split_dir`` (hidden ones skipped), unsorted order not relied on."""
    with os.scandir(split_dir) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]


def order_classes(names: Sequence[str], classes_txt: Path | None = None) -> list[str]:
    """Class names (NFC) in index order (see the module docstring for the rule).

    Raises:
        ValueError: two folders have the same name in different Unicode forms, ``classes.txt`` lists a name twice
            or lacks a folder.
    """
    by_nfc: dict[str, list[str]] = {}
    for n in names:
        by_nfc.setdefault(nfc(n), []).append(n)
    twins = [sorted(v) for v in by_nfc.values() if len(v) > 1]
    if twins:
        raise ValueError(f"class folders {[ascii(n) for n in twins[0]]} are one name in different Unicode forms "
                         f"(NFC / NFD, e.g. one copied from macOS); rename or merge them")
    names = list(by_nfc)
    if classes_txt is not None and classes_txt.is_file():
        listed = [nfc(ln.strip()) for ln in classes_txt.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        if len(set(listed)) != len(listed):
            raise ValueError(f"{classes_txt} lists a class name twice")
        missing = sorted(set(names) - set(listed))
        if missing:
            raise ValueError(f"class folders {missing[:5]} are not listed in {classes_txt} "
                             f"({len(missing)} missing); add them or remove the file")
        return listed
    if names and all(n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def find_images(class_dir: str | Path) -> tuple[list[str], list[str]]:
    """Image files below ``class_dir`` (recursively) and the files skipped there, each with the reason.

    Symlinked files and folders are followed; a folder that is its own ancestor (a symlink loop) is not walked
    again (silently: its images are listed already). Hidden files and folders are ignored. Images are sorted by
    their path components below ``class_dir``.
    Skipped (reported, not read): broken symlinks, image-like files that are not regular files, files with an
    extension of :data:`OTHER_IMAGE_EXTENSIONS`, folders that cannot be read.
    """
    found: list[tuple[tuple[str, ...], str]] = []
    skipped: list[str] = []

    def walk(folder: str, rel: tuple[str, ...], ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:  # a symlink to a folder above it: its images are already listed
                return
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            skipped.append(f"{folder} (unreadable folder: {err.strerror or err})")
            return
        ancestors = ancestors | {key}
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow symlinks; free for plain entries
            except OSError:
                is_dir = is_file = False
            if is_dir:
                walk(e.path, (*rel, name), ancestors)
            elif name.lower().endswith(IMG_EXTENSIONS):
                if is_file:
                    found.append(((*rel, name), e.path))
                else:
                    skipped.append(f"{e.path} ({'broken symlink' if e.is_symlink() else 'not a regular file'})")
            elif e.is_symlink() and not is_file:
                skipped.append(f"{e.path} (broken symlink)")
            elif name.lower().endswith(OTHER_IMAGE_EXTENSIONS):
                skipped.append(f"{e.path} (a format that is not read; convert it to JPEG or PNG)")

    walk(os.fspath(class_dir), (), frozenset())
    found.sort()
    return [p for _, p in found], skipped


def list_images(split_dir: Path, class_to_idx: Mapping[str, int],
                require_images: bool = False) -> tuple[list[str], list[int]]:
    """All image paths of a split, class by class in index order (see :func:`find_images`); with their labels.

    Args:
        split_dir: the split folder, holding one folder per class.
        class_to_idx: class index of each accepted folder name (compared in NFC form); several names may map to
            one index (CIFAR accepts ``cat/`` or ``3/``), but a split may use only one folder per class.
        require_images: refuse class folders that hold no image (the training split: a class without images
            cannot be learnt, and would still count as a class).

    Raises:
        ValueError: unknown class folders, two folders of one class, or (``require_images``) empty class folders.
    """
    lookup = {nfc(n): i for n, i in class_to_idx.items()}
    canonical: dict[int, str] = {}
    for n, i in class_to_idx.items():
        canonical.setdefault(i, n)
    present = list_class_dirs(split_dir)
    unknown = sorted(n for n in present if nfc(n) not in lookup)
    if unknown:
        raise ValueError(f"{split_dir} has class folders {unknown[:5]} that are not classes of the dataset "
                         f"(known: {list(class_to_idx)[:5]}...); check the layout or classes.txt")
    folders: dict[int, list[str]] = {}
    for n in present:
        folders.setdefault(lookup[nfc(n)], []).append(n)
    clashes = {i: sorted(ns) for i, ns in sorted(folders.items()) if len(ns) > 1}
    if clashes:
        i, ns = next(iter(clashes.items()))
        raise ValueError(f"{split_dir} has several folders for one class: {ns} are all class {i} "
                         f"({canonical[i]!r}){f' (and {len(clashes) - 1} more classes)' if len(clashes) > 1 else ''}; "
                         f"keep one folder per class (move the images into one of them)")
    paths: list[str] = []
    targets: list[int] = []
    skipped: list[str] = []
    empty: list[str] = []
    for i, names in sorted(folders.items()):  # one folder per class (checked above)
        name = names[0]
        files, bad = find_images(split_dir / name)
        skipped += bad
        if not files:
            empty.append(name)
        paths += files
        targets += [i] * len(files)
    if skipped:
        log.warning("%s: skipped %d file(s) or folder(s) that look like images but cannot be read: %s%s; fix or "
                    "remove them", split_dir, len(skipped), "; ".join(skipped[:5]),
                    " ..." if len(skipped) > 5 else "")
    if require_images and empty:
        raise ValueError(
            f"{split_dir}: class folders {sorted(empty)[:10]} ({len(empty)} of {len(folders)}) hold no images "
            f"(searched recursively for {', '.join(IMG_EXTENSIONS)}; hidden files are ignored"
            f"{f'; {len(skipped)} skipped file(s) reported above' if skipped else ''}); a training class needs "
            f"images: add some, or remove the empty folders from {split_dir}")
    return paths, targets


def read_image_file(path: str) -> torch.Tensor:
    """The bytes of an image file as a uint8 tensor (any file name, also one that is not valid UTF-8).

    Raises:
        ValueError: the file is empty (named in the message).
        OSError: the file cannot be opened (named in the message).
    """
    with open(path, "rb") as fh:
        data = np.fromfile(fh, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"cannot decode the image file {path} (the file is empty: 0 bytes); remove or replace it")
    return torch.from_numpy(data)


def load_image(path: str) -> torch.Tensor:
    """Decode one image file to a uint8 RGB tensor ``[3, H, W]`` (EXIF orientation applied).

    Raises:
        ValueError: the file cannot be decoded (named in the message).
    """
    return _decode_named(path, read_image_file(path))


class ImageFiles(Dataset):
    """Lazily decoded image files: ``ds[i] -> (uint8 [3, H, W], label)``.

    Args:
        paths: image file paths.
        targets: labels, one per path.
        size: if set, every image must be ``size x size`` pixels (CIFAR trees); another size is an error.
    """

    def __init__(self, paths: list[str], targets: list[int], size: int | None = None) -> None:
        self.paths = paths
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_image(self.paths[i])
        if self.size is not None and tuple(img.shape[1:]) != (self.size, self.size):  # as decode_all refuses them
            raise ValueError(f"{self.paths[i]} is {tuple(img.shape[1:])} pixels; this dataset expects "
                             f"{self.size}x{self.size} images")
        return img, int(self.targets[i])


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


def split_tag(split_dir: Path, dataset_dir: Path) -> str:
    """The cache tag of a split folder: its path below the dataset directory, ``/`` as ``-`` (``a/images`` and
    ``b/images`` must not share one, or each split's cache would remove the other's as an older version)."""
    return os.path.relpath(split_dir, dataset_dir).replace(os.sep, "-")


def cache_prefix(size: int, square_for: int | None = None, tag: str | None = None) -> str:
    """Start of a decoded-image cache file name: ``decoded-[<tag>-]s<size>[c<square_for>]``.

    ``tag`` (the split folder's name) is kept when it is made of letters, digits, ``_`` and ``-`` (else replaced by
    a short hash of it), so that caches of other splits never look like this one's older versions.
    """
    sizes = f"s{size}" if square_for is None else f"s{size}c{square_for}"
    if tag is None:
        return f"decoded-{sizes}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", tag):
        tag = "h" + hashlib.sha1(os.fsencode(tag)).hexdigest()[:10]
    return f"decoded-{tag}-{sizes}"


def decode_all(paths: list[str], size: int, cache_dir: Path | None = None, chunk: int = 1024,
               square_for: int | None = None, fingerprint: str | None = None,
               cache_tag: str | None = None) -> torch.Tensor:
    """Decode every image into one uint8 tensor ``[N, 3, size, size]``, optionally cached as ``.npy``.

    Args:
        paths: image files.
        size: side of the stored images.
        cache_dir: where the ``.npy`` cache lives (None = no cache). Its file name
            ``decoded-<tag>-s<size>[c<square_for>]-<N>-<key>.npy`` is keyed by the files
            (:func:`~fct_lightning.data.base.files_fingerprint` relative to ``cache_dir``'s parent: paths, sizes,
            modification times), ``size``, ``square_for`` and :data:`DECODER_VERSION`, so a changed tree (or a
            decoder that gives other pixels) is decoded again. After a new cache file is written, the older ones of
            the same ``cache_tag`` and sizes, the caches of earlier decoder versions named without a tag, and the
            ``*.tmp`` files of writers that died (untouched for :data:`STALE_TMP_S`) are removed from
            ``cache_dir``. A cache that cannot be written (read-only root) is skipped with a warning.
        chunk: files read per batch.
        square_for: None = every image must already be ``size x size``; an int ``c`` = images of any shape
            are stored as :func:`square_for_eval` squares whose ``c`` centre crop is the evaluation view.
        fingerprint: the files' fingerprint relative to ``cache_dir``'s parent, when the caller has it.
        cache_tag: names the cached split (its folder name), see :func:`cache_prefix`; None = no tag, and then
            older caches are not removed.

    Raises:
        ValueError: an image is not ``size x size`` (``square_for`` None), or a file cannot be decoded.
    """
    cache_file = prefix = None
    if cache_dir is not None:
        h = hashlib.sha1((f"decoder{DECODER_VERSION}/{size}" if square_for is None
                          else f"decoder{DECODER_VERSION}/{size}/{square_for}").encode())
        h.update((fingerprint or files_fingerprint(paths, cache_dir.parent)).encode())
        prefix = cache_prefix(size, square_for, cache_tag)
        cache_file = cache_dir / f"{prefix}-{len(paths)}-{h.hexdigest()[:20]}.npy"
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
        datas = [read_image_file(p) for p in batch]
        imgs = None
        if all(p.lower().endswith(JPEG_EXTENSIONS) for p in batch):
            with contextlib.suppress(RuntimeError):  # a bad file: decode one by one below, to name it
                imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if imgs is None:  # per file: Pillow formats, 16-bit PNGs and unreadable files are handled there
            imgs = [_decode_named(p, d) for p, d in zip(batch, datas, strict=True)]
        for j, img in enumerate(imgs):
            if square_for is not None:
                img = square_for_eval(img, size, square_for)
            elif img.shape[1:] != (size, size):
                raise ValueError(f"{batch[j]} is {tuple(img.shape[1:])} pixels; this dataset expects "
                                 f"{size}x{size} images")
            out[start + j] = img
    if cache_file is not None and _save_npy(cache_file, out.numpy()):
        _remove_stale_caches(cache_file, prefix if cache_tag is not None else None)
    return out


def _as_uint8(img: torch.Tensor) -> torch.Tensor:
    """8 bits per channel: 16-bit PNGs decode to uint16, which would wrap around when stored as uint8."""
    return img if img.dtype == torch.uint8 else TF.to_dtype(img, torch.uint8, scale=True)


def _webp_with_exif(data: torch.Tensor) -> bool:
    """An extended WebP file (``VP8X``) whose flags say it holds EXIF data (torchvision ignores its orientation)."""
    head = data[:21].numpy().tobytes()
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x08)


def _decode_named(path: str, data: torch.Tensor) -> torch.Tensor:
    """torchvision's decoder (JPEG, PNG, WebP, GIF), else Pillow (BMP, PPM/PGM, TIFF, WebP with EXIF); EXIF
    orientation applied, the first frame of an animation; a clear error naming the file otherwise."""
    if _webp_with_exif(data):
        first = "a WebP file with EXIF data"
    else:
        try:
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            return _as_uint8(img[0] if img.ndim == 4 else img)  # an animated GIF: [frames, 3, H, W]
        except RuntimeError as err:
            first = (str(err).splitlines() or [type(err).__name__])[-1]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy())) as im:
            arr = pil_to_rgb(im)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"cannot decode the image file {path}: {err} Pillow refuses images this large as a guard against "
            f"decompression bombs; if the file is trusted, raise the limit before the data is read (e.g. "
            f"`import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = 500_000_000`, None = no limit, in the script that "
            f"starts the run), or downscale the image") from err
    except Exception as err:  # Pillow's plugins raise OSError, ValueError, SyntaxError, EOFError, ...
        raise ValueError(f"cannot decode the image file {path} ({first}; Pillow: {type(err).__name__}: {err}); "
                         f"remove or replace it") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def pil_to_rgb(im: object) -> np.ndarray:
    """A Pillow image as an ``[H, W, 3]`` uint8 array, EXIF orientation applied.

    8-bit modes (``L``, ``P``, ``RGBA``, ``CMYK``, ``1``, ...) go through ``convert("RGB")``. Deeper grey images,
    which ``convert`` would clip to 0 or 255, are scaled (negative values become 0): ``I;16*`` by their bit depth
    (16 bits: ``value >> 8``, as torchvision scales 16-bit PNGs; a 12-bit TIFF: ``value * 255 / 4095``); ``I``
    (32-bit integers, and 16-bit PGM/PPM files) like 16 bits when every value fits, else by the maximum; ``F``
    (floats) ``* 255`` when the values are within [0, 1], else by the maximum.
    """
    from PIL import ImageOps

    bits = None
    tags = getattr(im, "tag_v2", None)  # TIFF: BitsPerSample
    if tags is not None:
        b = tags.get(258)
        b = b[0] if isinstance(b, tuple) and b else b
        bits = b if isinstance(b, int) and 0 < b < 16 else None
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode not in ("I", "F") and not mode.startswith("I;16"):
        return np.array(im.convert("RGB"))  # a writable copy
    a = np.asarray(im)
    if mode == "F":
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        v = np.clip(np.where(finite, a, 0.0), 0.0, None)
        top = float(v.max(initial=0.0))
        g = np.rint(v * (255.0 if top <= 1.0 else 255.0 / top))
        g[np.isposinf(a)] = 255
    else:
        v = np.clip(a.astype(np.int64), 0, None)
        top = int(v.max(initial=0))
        if bits is not None and mode.startswith("I;16"):
            g = np.rint(v * (255.0 / (2**bits - 1)))
        elif top <= 65535:
            g = v >> 8
        else:
            g = np.rint(v * (255.0 / top))
    g = np.clip(g, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))


_LEGACY_CACHE = re.compile(r"decoded-\d+-[0-9a-f]{20}\.npy")  # named before DECODER_VERSION: never read again
_TMP_FILE = re.compile(r"decoded-.+\.npy\.(\d+)\.tmp")


def _save_npy(path: Path, arr: np.ndarray) -> bool:
    """Write ``arr`` to ``path`` atomically (a ``.<pid>.tmp`` file renamed); False (with a warning) if it fails."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the decoded-image cache %s (%s); continuing without it", path, err)
        tmp.unlink(missing_ok=True)
        return False
    return True


def _remove_stale_caches(keep: Path, prefix: str | None) -> None:
    """Delete, next to the cache file ``keep``, the files this module wrote that can no longer be used: caches named
    ``<prefix>-<N>-<key>.npy`` other than ``keep`` (the same split and sizes, older file lists), caches of the
    untagged pre-:data:`DECODER_VERSION` format, and ``*.<pid>.tmp`` files untouched for :data:`STALE_TMP_S`."""
    same = re.compile(re.escape(prefix) + r"-\d+-[0-9a-f]{20}\.npy") if prefix else None
    now = time.time()
    try:
        with os.scandir(keep.parent) as it:
            entries = [e for e in it if e.name != keep.name]
    except OSError:
        return
    for e in entries:
        stale = bool(_LEGACY_CACHE.fullmatch(e.name) or (same is not None and same.fullmatch(e.name)))
        tmp = _TMP_FILE.fullmatch(e.name)
        if not stale and tmp is not None and int(tmp.group(1)) != os.getpid():
            with contextlib.suppress(OSError):
                stale = now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_S
        if stale and e.is_file(follow_symlinks=False):
            try:
                os.unlink(e.path)
                log.info("removed the stale decoded-image cache file %s", e.path)
            except OSError as err:
                log.warning("could not remove the stale decoded-image cache file %s (%s)", e.path, err)


def find_dataset_dir(root: Path, name: str, train_dir: str) -> Path | None:
    """The dataset directory: ``root/<name>`` if it holds ``<train_dir>/``, else ``root`` if it does, else None.

    ``root/<name>`` comes first: a data root may hold the user's own tree (``<root>/train/...``, the ``folder``
    dataset) next to ``<root>/imagenet/train/...``, and ``--dataset imagenet`` must not train on the former. When
    both hold ``<train_dir>/`` the choice is logged (a warning naming both), since either could have been meant;
    point ``--data.root`` at the dataset directory itself to use the other one. ``--dataset folder`` with ``root``
    pointing straight at a tree still finds it (``root/folder/`` does not exist).
    """
    nested = root / name
    if (nested / train_dir).is_dir():
        if (root / train_dir).is_dir() and not _same_dir(root / train_dir, nested / train_dir):
            log.warning("%s: both %s and %s hold %s/; using %s (to use %s instead, point --data.root at a "
                        "folder that holds it without a %s/ sub-folder)", name, root, nested, train_dir, nested,
                        root / train_dir, name)
        return nested
    if (root / train_dir).is_dir():
        return root
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class FolderDataModule(RetrievalDataModule):
    """Base of the ImageFolder datamodules (224 px transforms, ImageNet mean/std, lazy decoding).

    Args:
        root: data root holding ``<name>/<train_dir>/`` and ``<name>/<eval_dir>/`` (preferred), or
            ``<train_dir>/`` and ``<eval_dir>/`` itself (see :func:`find_dataset_dir`); None = ``$FCT_DATA_ROOT``,
            else ``data``.
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
