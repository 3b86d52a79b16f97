"""ImageFolder trees: finding the images of a split and fixing the class order.

A class folder is searched recursively, as torchvision's ``ImageFolder`` does: images in its sub-folders (e.g.
``train/<class>/batch1/*.jpg``) belong to the class, symlinked files and folders are followed (a symlink back to a
folder above it is not walked twice). Hidden files and folders (names starting with ``.``, e.g. macOS ``._*.jpg``
and ``.DS_Store``) are skipped. Broken symlinks and files of image formats that are not read here (HEIC, AVIF, ...)
are skipped with a warning naming a few. The class order rule is :func:`order_classes`'s (see
:mod:`fct_lightning.data.folder`).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jfif")
OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jpe", ".pbm", ".pnm", ".ico", ".tga",
                          ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw", ".raw", ".exr", ".hdr", ".dcm")
"""Image formats that are not read: such files in a class folder are reported (skipped) rather than ignored."""


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
