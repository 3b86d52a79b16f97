"""CIFAR-10 and CIFAR-100, from torchvision's pickles or from an ImageFolder tree of 32x32 images.

Accepted layouts, searched in ``root`` and then in ``root/<name>`` (``name`` = ``cifar10`` / ``cifar100``):

* torchvision's files: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` or
  ``cifar-100-python/{train, test, meta}`` (``download=True`` fetches them in ``prepare_data``; offline it fails);
* an ImageFolder tree ``<train_dir>/<class>/*.jpg|png`` and ``<eval_dir>/<class>/...``, class folders named by
  the canonical class names (or by their integer index; one folder per class: a split holding both ``cat/`` and
  ``3/`` is refused), read as in :mod:`fct_lightning.data.image_tree` (sub-folders searched, hidden files skipped,
  a training class folder without images refused). The offline JPEG archive extracts to
  ``<dir>/cifar10/{train,test}/<class>/NNNN.jpg``: point ``root`` at ``<dir>`` or ``<dir>/cifar10``.

Class index order is the canonical CIFAR order (torchvision's ``classes``, alphabetical for both datasets),
whatever the layout. Splits are ``"train"`` and ``"test"``.

ImageFolder splits of at most ``MAX_IN_MEMORY`` images are decoded once (batched libjpeg decoding, about 5 s for
CIFAR-10's 60k JPEGs on 2 CPU cores) into one uint8 tensor, so epochs are not bound by JPEG decoding; the decoded
array is cached as ``<dataset dir>/.cache/decoded-<split folder>-s32-<N>-<hash of the file list>.npy``
(``cache_decoded=False`` disables it; a read-only tree just skips it; a new cache replaces the split's older ones).
Larger splits are decoded lazily per item.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from fct_lightning.data.base import RetrievalDataModule, TensorImages
from fct_lightning.data.decode import ImageFiles, decode_all, split_tag
from fct_lightning.data.image_tree import list_images
from fct_lightning.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
)

MAX_IN_MEMORY = 200_000

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
]


def _unpickle(path: Path) -> dict:
    """A torchvision CIFAR batch file: a pickled dict of strings, lists of numbers and one uint8 numpy array.

    A pickle can run code, so only the objects such a file needs are rebuilt: numpy's array reconstruction
    (``numpy.core.multiarray._reconstruct``, which numpy 2 writes as ``numpy._core.multiarray``, ``numpy.ndarray``,
    ``numpy.dtype``) and ``_codecs.encode`` to latin-1 (how Python 3 stores bytes at pickle protocol 2). A file
    that asks for anything else is refused with a ValueError naming the file, before it is loaded.
    """
    import codecs

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    def refuse(what: str) -> ValueError:
        return ValueError(f"{path} asks for {what}, which a CIFAR batch file does not need; it was not loaded "
                          "(unpickling it could run code). Use torchvision's CIFAR files (download=True, or the "
                          "original cifar-10-python.tar.gz / cifar-100-python.tar.gz).")

    def latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding not in ("latin1", "latin-1") or errors != "strict":
            raise refuse(f"_codecs.encode with {encoding!r}, {errors!r}")
        return codecs.encode(text, "latin1")

    allowed: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # torchvision's files (Python 2, numpy 1)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # the same array pickled by numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): latin1,
    }

    class CIFARUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in allowed:
                raise refuse(f"the Python object {module}.{name}")
            return allowed[module, name]

    with open(path, "rb") as fh:
        d = CIFARUnpickler(fh, encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


class CIFARDataModule(RetrievalDataModule):
    """Shared CIFAR logic; use :class:`CIFAR10DataModule` or :class:`CIFAR100DataModule`.

    Args:
        train_dir: ImageFolder training split folder.
        eval_dir: ImageFolder test split folder.
        download: download torchvision's files in ``prepare_data`` when nothing is found (needs internet).
        cache_decoded: cache decoded ImageFolder images as ``.npy`` under ``<dataset dir>/.cache``.
        **kwargs: the arguments of :class:`~fct_lightning.data.base.RetrievalDataModule` (``root``: the directory
            with torchvision's files or the ImageFolder tree, or its parent holding ``cifar10/`` / ``cifar100/``).
    """

    family = "cifar"
    in_channels = 3
    default_image_size = 32
    supports_in_memory = True
    pickle_dir: str = ""
    pickle_files: ClassVar[dict[str, list[str]]] = {}
    label_key: str = "labels"
    torchvision_class: str = ""

    def __init__(self, *, train_dir: str = "train", eval_dir: str = "test", download: bool = False,
                 cache_decoded: bool = True, **kwargs: Any) -> None:
        self.train_dir = train_dir
        self.eval_dir = eval_dir
        self.download = download
        self.cache_decoded = cache_decoded
        super().__init__(**kwargs)

    def layout_help(self) -> str:
        r, n = self.root, self.name
        files = ", ".join(f for split_files in self.pickle_files.values() for f in split_files)
        return (f"expected torchvision's files {r}/{self.pickle_dir}/ ({files}) "
                f"or an ImageFolder tree {r}/{self.train_dir}/<class>/*.jpg and {r}/{self.eval_dir}/<class>/*.jpg "
                f"(either also accepted under {r}/{n}/). Fix: set --data.root (or $FCT_DATA_ROOT); offline, extract "
                f"an ImageFolder archive (e.g. tar xzf cifar10-jpeg.tar.gz -C <dir>, then --data.root <dir>); "
                f"online, --data.download true")

    def locate(self) -> tuple[str, Path] | None:
        """``("pickle", dir)`` or ``("folder", dir)`` for the first layout found, else None."""
        root = self.root
        if root.name == self.pickle_dir and root.is_dir():
            return "pickle", root
        for cand in (root, root / self.name):
            if (cand / self.pickle_dir).is_dir():
                return "pickle", cand / self.pickle_dir
            if (cand / self.train_dir).is_dir() or (cand / self.eval_dir).is_dir():
                return "folder", cand
        return None

    def prepare_data(self) -> None:
        """Download when asked and nothing is found; for an ImageFolder tree with ``cache_decoded``, decode the
        training and evaluation splits here, once per node (Lightning runs this on one process before ``setup``),
        so the other ranks read the cache instead of decoding too."""
        found = self.locate()
        if found is not None:
            if found[0] == "folder" and self.cache_decoded:
                for split in ("train", self.eval_split):
                    self.source(split)
            return
        if not self.download:
            return
        import torchvision.datasets as tvd

        try:
            for train in (True, False):
                getattr(tvd, self.torchvision_class)(str(self.root), train=train, download=True)
        except Exception as err:  # offline: URLError, OSError, ...
            raise FileNotFoundError(
                f"{self.name}: data not found and download=True failed ({type(err).__name__}: {err}); "
                f"{self.layout_help()}") from err

    def _load_split(self, split: str) -> Dataset:
        found = self.locate()
        if found is None:
            raise FileNotFoundError(f"{self.name}: data not found under {self.root}: {self.layout_help()}")
        kind, where = found
        return self._load_pickles(where, split) if kind == "pickle" else self._load_folder(where, split)

    def _load_pickles(self, where: Path, split: str) -> TensorImages:
        files = [where / f for f in self.pickle_files[split]]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name}: {where} lacks {missing}; {self.layout_help()}")
        xs, ys = [], []
        for f in files:
            try:
                d = _unpickle(f)
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[self.label_key], dtype=np.int64))
            except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as err:
                raise ValueError(f"{self.name}: {f} is not a torchvision CIFAR pickle "
                                 f"(needs 'data' [N, 3072] uint8 and '{self.label_key}'): {err!r}") from err
        return TensorImages(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    def _load_folder(self, where: Path, split: str) -> Dataset:
        split_dir = where / (self.train_dir if split == "train" else self.eval_dir)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: split folder {split_dir} is missing; {self.layout_help()}")
        mapping = {n: i for i, n in enumerate(self.class_names)} | {str(i): i for i in range(self.num_classes)}
        paths, targets = list_images(split_dir, mapping, require_images=split == "train")
        if not paths:
            raise FileNotFoundError(f"{self.name}: no images in {split_dir}; {self.layout_help()}")
        if len(paths) > MAX_IN_MEMORY:
            return ImageFiles(paths, targets, size=32)
        cache = where / ".cache" if self.cache_decoded else None
        fp = self.record_fingerprint(split, paths, where)
        return TensorImages(decode_all(paths, 32, cache, fingerprint=fp, cache_tag=split_tag(split_dir, where)),
                            torch.as_tensor(targets))


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 10 classes, 50k train / 10k test 32x32 images; the arguments of :class:`CIFARDataModule`."""

    name = "cifar10"
    num_classes = 10
    class_names: ClassVar[list[str]] = CIFAR10_CLASSES
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    pickle_dir = "cifar-10-batches-py"
    pickle_files: ClassVar[dict[str, list[str]]] = {
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    label_key = "labels"
    torchvision_class = "CIFAR10"


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 100 fine classes, 50k train / 10k test 32x32 images; the arguments of :class:`CIFARDataModule`."""

    name = "cifar100"
    num_classes = 100
    class_names: ClassVar[list[str]] = CIFAR100_CLASSES
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    pickle_dir = "cifar-100-python"
    pickle_files: ClassVar[dict[str, list[str]]] = {"train": ["train"], "test": ["test"]}
    label_key = "fine_labels"
    torchvision_class = "CIFAR100"
