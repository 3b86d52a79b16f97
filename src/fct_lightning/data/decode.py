"""Decoding image files to uint8 RGB tensors, lazily per item or all at once into a cached ``.npy`` array."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from fct_lightning.data.fingerprint import files_fingerprint
from fct_lightning.data.image_tree import JPEG_EXTENSIONS
from fct_lightning.data.transforms import center_offset

log = logging.getLogger(__name__)

DECODER_VERSION = 2
"""Part of the decoded-image cache key; raise it whenever a change makes decoded pixels differ (2: EXIF orientation,
16-bit / 32-bit / float images read through Pillow scaled instead of clipped)."""

STALE_TMP_S = 3600.0
"""A cache ``*.tmp`` file not written to for this long belongs to a writer that died: it is removed."""


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
            (:func:`~fct_lightning.data.fingerprint.files_fingerprint` relative to ``cache_dir``'s parent: paths, sizes,
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
