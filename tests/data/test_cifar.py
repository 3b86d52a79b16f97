"""CIFAR-10/100 datamodules on fake torchvision pickles and fake ImageFolder trees."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fct_lightning.data import CIFAR10DataModule, CIFAR100DataModule
from fct_lightning.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from tests.data.fakes import make_cifar_pickles, make_imagefolder

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


def test_class_lists():
    assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)
    assert CIFAR10_CLASSES == sorted(CIFAR10_CLASSES)


def test_cifar10_pickles(tmp_path):
    make_cifar_pickles(tmp_path, 10, train_per_batch=20, num_test=30)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=16, train_classes=3)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.name) == (10, 3, 32, "cifar10")
    assert dm.class_names[0] == "airplane" and dm.train_class_ids == [0, 1, 2]
    dm.setup("fit")
    src = dm.source("train")
    assert len(src) == 100 and src.images.dtype == torch.uint8 and src.images.shape[1:] == (3, 32, 32)
    assert src.targets.tolist() == [i % 10 for i in range(20)] * 5
    x, y, _idx = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}
    assert len(dm.train_dataloader().dataset) == 30
    ys = torch.cat([b[1] for b in dm.val_dataloader()])
    assert len(ys) == 30 and sorted(ys.unique().tolist()) == list(range(10))
    # root may be the pickle directory itself or its parent's parent (<root>/cifar10/...)
    assert len(CIFAR10DataModule(root=str(tmp_path / "cifar-10-batches-py")).source("test")) == 30


def test_cifar10_pickle_pixels_roundtrip(tmp_path):
    out = make_cifar_pickles(tmp_path, 10, train_per_batch=10, num_test=10)
    import pickle

    with open(out / "test_batch", "rb") as fh:
        raw = pickle.load(fh)["data"]
    src = CIFAR10DataModule(root=str(tmp_path)).source("test")
    assert np.array_equal(src.images.numpy().reshape(10, -1), raw)


def test_cifar100_pickles_views2(tmp_path):
    make_cifar_pickles(tmp_path / "cifar100", 100, train_per_batch=40, num_test=100)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=8, views=2, train_classes=[5, 99])
    assert dm.num_classes == 100 and dm.class_names[3] == "bear" and dm.class_names[5] == "bed"
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 2, 3, 32, 32) and set(y.tolist()) == {5, 99}
    assert sorted(idx.tolist()) == [0, 1, 2, 3]


def test_cifar_imagefolder_canonical_order(tmp_path):
    # folders created in a scrambled order; a test split missing a class is fine
    names = ["truck", "airplane", "cat", "bird", "automobile", "deer", "dog", "frog", "horse", "ship"]
    make_imagefolder(tmp_path / "cifar10", names, {"train": 3, "test": 2}, size=32, ext="jpg+png",
                     classes_by_split={"test": names[:-1]})
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, cache_decoded=True)
    src = dm.source("train")
    assert len(src) == 30 and src.images.shape == (30, 3, 32, 32)
    assert src.targets.tolist() == [i for i in range(10) for _ in range(3)]
    assert len(dm.source("test")) == 18 and 8 not in dm.source("test").targets.tolist()  # no "ship" in test
    assert list((tmp_path / "cifar10" / ".cache").glob("decoded-train-s32-30-*.npy"))
    again = CIFAR10DataModule(root=str(tmp_path / "cifar10")).source("train")  # served from the .npy cache
    assert torch.equal(again.images, src.images)
    # prepare_data (one process per node under DDP) decodes both splits, so the other ranks only read the cache
    for f in (tmp_path / "cifar10" / ".cache").iterdir():
        f.unlink()
    CIFAR10DataModule(root=str(tmp_path / "cifar10")).prepare_data()
    assert len(list((tmp_path / "cifar10" / ".cache").glob("decoded-*.npy"))) == 2  # train (30) and test (18)


def test_cifar_imagefolder_unknown_class_and_wrong_size(tmp_path):
    make_imagefolder(tmp_path / "a", ["airplane", "spaceship"], ("train", "test"), size=32)
    with pytest.raises(ValueError, match="spaceship"):
        CIFAR10DataModule(root=str(tmp_path / "a")).setup()
    make_imagefolder(tmp_path / "b", ["airplane"], ("train", "test"), size=12)
    with pytest.raises(ValueError, match="32x32"):
        CIFAR10DataModule(root=str(tmp_path / "b"), cache_decoded=False).setup()


def test_missing_root_error_names_layouts(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"))  # no error before data is needed
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*ImageFolder.*--data.root"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="download"):
        CIFAR10DataModule(root=str(tmp_path / "nowhere")).train_dataloader()


def test_malformed_pickles(tmp_path):
    out = make_cifar_pickles(tmp_path, 10, train_per_batch=4, num_test=4)
    (out / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path)).source("train")
    (out / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a torchvision CIFAR pickle"):
        CIFAR10DataModule(root=str(tmp_path)).source("test")


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def boom(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", boom)
    with pytest.raises(FileNotFoundError, match="download=True failed.*network unreachable"):
        CIFAR10DataModule(root=str(tmp_path), download=True).prepare_data()


def test_in_memory_path_matches_items(tmp_path):
    make_cifar_pickles(tmp_path, 10, train_per_batch=10, num_test=10)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=7, in_memory_gpu=True, train_classes=5)
    loader = dm.train_dataloader()
    seen = torch.cat([b[2] for b in loader])
    assert sorted(seen.tolist()) == list(range(25))
    x, y, _i = next(iter(dm.val_dataloader()))
    ref = dm.dataset("test")
    assert torch.allclose(x[0].cpu(), ref[0][0], atol=1e-6) and int(y[0]) == ref[0][1]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="offline CIFAR-10 JPEG archive not available")
def test_real_cifar10_jpeg_archive(tmp_path):
    import tarfile
    import time

    with tarfile.open(SHARED) as tf:
        tf.extractall(tmp_path)
    t = time.perf_counter()
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=256)
    dm.setup("fit")
    first = time.perf_counter() - t
    assert len(dm.source("train")) == 50_000 and len(dm.source("test")) == 10_000
    counts = torch.bincount(dm.source("train").targets, minlength=10)
    assert counts.tolist() == [5000] * 10
    t = time.perf_counter()
    CIFAR10DataModule(root=str(tmp_path / "cifar10")).setup("fit")
    cached = time.perf_counter() - t
    print(f"decode {first:.1f}s, from cache {cached:.2f}s")
    assert cached < first


def test_cifar_imagefolder_one_folder_per_class_and_no_empty_training_class(tmp_path):
    """A tree holding both ``cat/`` and ``3/`` (one class's name and index) is refused instead of merged; a training
    class folder without images is refused; an empty test class folder is fine."""
    make_imagefolder(tmp_path / "a", ["cat", "3", "dog"], ("train", "test"), per_class=1, size=32)
    with pytest.raises(ValueError, match=r"\['3', 'cat'\] are all class 3 \('cat'\).*one folder per class"):
        CIFAR10DataModule(root=str(tmp_path / "a"), cache_decoded=False).source("train")
    make_imagefolder(tmp_path / "b", ["cat", "dog"], ("train", "test"), per_class=1, size=32)
    for split in ("train", "test"):
        (tmp_path / "b" / split / "dog" / "0000.jpg").unlink()
        (tmp_path / "b" / split / "dog" / ".DS_Store").write_bytes(b"Bud1")
    dm = CIFAR10DataModule(root=str(tmp_path / "b"), cache_decoded=False)
    assert dm.source("test").targets.tolist() == [3]
    with pytest.raises(ValueError, match=r"class folders \['dog'\] \(1 of 2\) hold no images"):
        dm.source("train")


def test_lazy_tree_refuses_images_of_another_size(tmp_path, monkeypatch):
    """Above the in-memory limit the tree is read file by file; a non-32 px image is refused there too (as when it
    is decoded into memory), not fed to the model at its own size."""
    from fct_lightning.data import cifar

    root = make_imagefolder(tmp_path / "cifar10", list(CIFAR10_CLASSES), {"train": 1, "test": 1}, size=32, ext="png")
    odd = root / "test" / "cat" / "odd.png"
    from PIL import Image

    Image.new("RGB", (48, 40)).save(odd)
    monkeypatch.setattr(cifar, "MAX_IN_MEMORY", 1)
    ds = CIFAR10DataModule(root=str(tmp_path)).source("test")
    sizes = []
    for i in range(len(ds)):
        try:
            sizes.append(tuple(ds[i][0].shape))
        except ValueError as err:
            assert "odd.png is (40, 48) pixels; this dataset expects 32x32 images" in str(err)
            sizes.append("refused")
    assert sizes.count("refused") == 1 and set(sizes) == {(3, 32, 32), "refused"}
