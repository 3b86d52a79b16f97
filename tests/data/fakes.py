"""Tiny generated datasets in the real on-disk layouts, for tests anywhere in the suite.

Images carry a class signal (mean brightness / colour grows with the class index, plus noise), so smoke tests
that train a few steps can see the loss move.

    from tests.data.fakes import make_imagefolder, make_cifar_pickles
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _class_image(rng: np.random.Generator, label: int, num_classes: int, size: int, channels: int = 3) -> np.ndarray:
    """HxWxC uint8 image whose colour encodes ``label``."""
    base = np.zeros(channels) + 40 + 170 * label / max(1, num_classes - 1)
    if channels == 3:
        base = base * np.array([1.0, 0.6 + 0.4 * (label % 2), 1.0 - 0.5 * (label % 3) / 2])
    img = base + rng.normal(0, 20, size=(size, size, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder(
    root: str | Path,
    classes: int | Sequence[str] = 3,
    splits: dict[str, int] | Sequence[str] = ("train", "val"),
    per_class: int = 4,
    size: int = 12,
    ext: str = "jpg",
    seed: int = 0,
    classes_by_split: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Write ``root/<split>/<class>/<NNNN>.<ext>`` and return ``root``.

    Args:
        root: directory to create (parents included).
        classes: class folder names, or an int N for ``class_000 ... class_{N-1}``.
        splits: split folder names, or ``{split: images per class}``.
        per_class: images per class (when ``splits`` is a sequence).
        size: image side in pixels.
        ext: ``"jpg"`` or ``"png"`` (mixed ``"jpg+png"`` alternates).
        seed: RNG seed of the pixel noise.
        classes_by_split: optional per-split class subsets (e.g. a test split missing a class).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    names = [f"class_{i:03d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    counts = dict(splits) if isinstance(splits, dict) else {s: per_class for s in splits}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        split_names = list(classes_by_split.get(split, names)) if classes_by_split else names
        for name in split_names:
            label = names.index(name) if name in names else 0
            cdir = root / split / name
            cdir.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                e = ext if ext != "jpg+png" else ("jpg", "png")[j % 2]
                img = Image.fromarray(_class_image(rng, label, len(names), size))
                img.save(cdir / f"{j:04d}.{e}", **({"quality": 95} if e == "jpg" else {}))
    return root


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def make_cifar_pickles(
    root: str | Path,
    num_classes: int = 10,
    train_per_batch: int = 20,
    num_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write torchvision's CIFAR pickle layout under ``root`` and return that pickle directory.

    CIFAR-10 (``num_classes=10``): ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
    with ``train_per_batch`` items per batch. CIFAR-100 (``num_classes=100``): ``root/cifar-100-python/
    {train, test, meta}`` with ``5 * train_per_batch`` training items. Label of item ``i`` = ``i % num_classes``;
    pixel data is ``[N, 3072]`` uint8 (channel-major rows), encoding the label as in :func:`make_imagefolder`.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes={num_classes}: CIFAR fakes exist for 10 or 100 classes")
    rng = np.random.default_rng(seed)

    def batch(n: int) -> tuple[np.ndarray, list[int]]:
        labels = [i % num_classes for i in range(n)]
        data = np.stack([_class_image(rng, y, num_classes, 32).transpose(2, 0, 1).reshape(-1) for y in labels])
        return data, labels

    root = Path(root)
    if num_classes == 10:
        from fct_lightning.data.cifar import CIFAR10_CLASSES

        out = root / "cifar-10-batches-py"
        out.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            x, y = batch(train_per_batch)
            _dump(out / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
                                            "filenames": [f"f{i}_{j}.png" for j in range(len(y))]})
        x, y = batch(num_test)
        _dump(out / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y, "data": x})
        _dump(out / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": train_per_batch})
        return out
    from fct_lightning.data.cifar import CIFAR100_CLASSES

    out = root / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 5 * train_per_batch), ("test", num_test)):
        x, y = batch(n)
        _dump(out / split, {"fine_labels": y, "coarse_labels": [c // 5 for c in y], "data": x})
    _dump(out / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": [f"c{i}" for i in range(20)]})
    return out


def save_image(path: str | Path, array: np.ndarray, exif_orientation: int | None = None, **kwargs) -> Path:
    """Write ``array`` (``[H, W]`` or ``[H, W, C]``, any dtype Pillow accepts) with Pillow, parents created.

    The format follows the extension unless ``format=`` is given; ``exif_orientation`` stores an EXIF Orientation
    tag (6 = "rotate 90 degrees clockwise to display", as a phone's portrait photo).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(array).save(path, **kwargs)
    return path
