"""ImageFolder datamodules (ImageNet, Places-365, VGGFace2) on generated trees."""

import pytest
import torch

from fct_lightning.data import (
    DigitsDataModule,
    ImageNetDataModule,
    Places365DataModule,
    VGGFace2DataModule,
)
from fct_lightning.data.folder import order_classes
from tests.data.fakes import make_imagefolder


def test_numeric_class_order(tmp_path):
    names = [str(i) for i in range(12)]
    make_imagefolder(tmp_path, names, {"train": 2, "val": 1}, size=10)
    dm = Places365DataModule(root=str(tmp_path), batch_size=4, image_size=8)
    assert dm.num_classes == 12 and dm.class_names[10] == "10" and dm.class_names[2] == "2"
    src = dm.source("train")
    assert src.paths[20].endswith("/10/0000.jpg") and int(src.targets[20]) == 10


def test_sorted_names_and_classes_txt(tmp_path):
    assert order_classes(["n02", "n01", "n10"]) == ["n01", "n02", "n10"]
    make_imagefolder(tmp_path, ["b", "a", "c"], ("train", "val"), per_class=1, size=8)
    assert ImageNetDataModule(root=str(tmp_path)).class_names == ["a", "b", "c"]
    (tmp_path / "classes.txt").write_text("c\nb\na\nextra\n")
    dm = ImageNetDataModule(root=str(tmp_path))
    assert dm.class_names == ["c", "b", "a", "extra"] and dm.num_classes == 4
    (tmp_path / "classes.txt").write_text("c\nb\n")
    with pytest.raises(ValueError, match=r"\['a'\].*classes.txt"):
        ImageNetDataModule(root=str(tmp_path))


def test_imagenet_loaders_counts_subsets_views(tmp_path):
    make_imagefolder(tmp_path / "imagenet", 5, {"train": 3, "val": 2}, size=20, ext="png")
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=4, train_classes=[4, 1], views=2, image_size=16)
    assert dm.train_class_ids == [1, 4] and dm.eval_split == "val" and dm.in_channels == 3
    batches = list(dm.train_dataloader())
    x = batches[0][0]
    assert x.shape == (4, 2, 3, 16, 16) and x.dtype == torch.float32
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(6))
    assert set(torch.cat([b[1] for b in batches]).tolist()) == {1, 4}
    xs, ys, idx = zip(*dm.val_dataloader())
    assert torch.cat(idx).tolist() == list(range(10)) and sorted(set(torch.cat(ys).tolist())) == list(range(5))
    assert xs[0].shape[1:] == (3, 16, 16)
    assert len(dm.eval_dataloader("train").dataset) == 15


def test_vggface2_split_names_and_seeded(tmp_path):
    make_imagefolder(tmp_path, ["n000002", "n000001"], ("train", "test"), per_class=2, size=12)
    dm = VGGFace2DataModule(root=str(tmp_path), image_size=8)
    assert dm.splits == ("train", "test") and dm.class_names == ["n000001", "n000002"]
    a = dm.eval_dataloader("train", augment=True, seed=1)
    b = dm.eval_dataloader("train", augment=True, seed=1)
    assert torch.equal(next(iter(a))[0], next(iter(b))[0])
    with pytest.raises(ValueError, match=r"eval_split='val'.*\('train', 'test'\)"):
        VGGFace2DataModule(root=str(tmp_path), eval_split="val")


def test_custom_split_dirs(tmp_path):
    make_imagefolder(tmp_path, 2, ("training", "validation"), per_class=1, size=8)
    dm = ImageNetDataModule(root=str(tmp_path), train_dir="training", eval_dir="validation")
    assert len(dm.source("val")) == 2


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet: data not found.*<class>/\*\.jpg.*--data.root"):
        ImageNetDataModule(root=str(tmp_path / "missing"))
    make_imagefolder(tmp_path / "only_train", 3, ("train",), per_class=1, size=8)
    dm = ImageNetDataModule(root=str(tmp_path / "only_train"))
    with pytest.raises(FileNotFoundError, match="split folder .*val is missing"):
        dm.setup("fit")
    make_imagefolder(tmp_path / "extra", ["a", "b"], ("train",), per_class=1, size=8)
    make_imagefolder(tmp_path / "extra", ["a", "zzz"], ("val",), per_class=1, size=8)
    with pytest.raises(ValueError, match="zzz"):
        ImageNetDataModule(root=str(tmp_path / "extra")).setup("validate")
    with pytest.raises(ValueError, match="train_classes=4 is out of range"):
        ImageNetDataModule(root=str(tmp_path / "extra"), train_classes=4)


def _nonsquare_tree(root, ext="png"):
    """Images of assorted shapes (portrait, landscape, square, smaller and larger than the crop)."""
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    shapes = [(37, 50), (50, 37), (64, 64), (120, 81), (81, 121), (20, 33), (73, 74)]
    for split in ("train", "val"):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(shapes):
                img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
                if ext == "png":
                    write_png(img, str(d / f"{i}.png"))
                else:  # Pillow-only formats
                    from PIL import Image

                    Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.{ext}")
    return root


@pytest.mark.parametrize("size", [32, 57, 64])
def test_in_memory_eval_equals_per_item_eval(tmp_path, size):
    """The stored squares' centre crop is the per-item Resize + CenterCrop, for any aspect ratio."""
    from torchvision.transforms import v2

    root = _nonsquare_tree(tmp_path)
    lazy = ImageNetDataModule(root=str(root), image_size=size, batch_size=5)
    mem = ImageNetDataModule(root=str(root), image_size=size, batch_size=5, in_memory_gpu=True)
    side = round(size * 256 / 224)
    stored = mem.source("val").images
    assert stored.shape == (21, 3, side, side) and stored.dtype == torch.uint8
    o = round((side - size) / 2.0)
    per_item = v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(size)])
    for i in range(len(stored)):
        assert torch.equal(stored[i, :, o:o + size, o:o + size], per_item(lazy.source("val")[i][0])), i
    a = torch.cat([b[0] for b in lazy.eval_dataloader("val")])
    b = torch.cat([b[0] for b in mem.eval_dataloader("val")])
    assert torch.equal(b, a)  # bit for bit, after float conversion and normalisation too
    labels = torch.cat([b[1] for b in mem.eval_dataloader("val")])
    assert labels.tolist() == [c for c in range(3) for _ in range(7)]


def test_in_memory_training_batches_and_cache(tmp_path):
    root = _nonsquare_tree(tmp_path)
    dm = ImageNetDataModule(root=str(root), image_size=24, batch_size=4, train_classes=[0, 2], seed=3,
                            in_memory_gpu=True)
    batches = list(dm.train_dataloader())
    assert [b[0].shape for b in batches] == [(4, 3, 24, 24)] * 3 + [(2, 3, 24, 24)]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(14))
    assert set(torch.cat([b[1] for b in batches]).tolist()) == {0, 2}
    again = list(ImageNetDataModule(root=str(root), image_size=24, batch_size=4, train_classes=[0, 2], seed=3,
                                    in_memory_gpu=True).train_dataloader())
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, again, strict=True))  # seeded
    # the second datamodule read the cache; a different image size gets its own file
    assert len(list((root / ".cache").glob("decoded-*.npy"))) == 1
    ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=True).source("train")
    assert len(list((root / ".cache").glob("decoded-*.npy"))) == 2
    # contrastive views: colour jitter, grayscale and blur applied per view
    two = ImageNetDataModule(root=str(root), image_size=24, batch_size=8, views=2, in_memory_gpu=True)
    x = next(iter(two.train_dataloader()))[0]
    assert x.shape == (8, 2, 3, 24, 24) and torch.isfinite(x).all() and not torch.equal(x[:, 0], x[:, 1])
    assert ImageNetDataModule(root=str(root)).splits == ("train", "val")  # the hidden .cache is not a split


def test_in_memory_corrupt_cache_and_limits(tmp_path):
    root = _nonsquare_tree(tmp_path)
    first = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).source("val").images
    cache = next((root / ".cache").glob("decoded-*.npy"))
    cache.write_bytes(b"truncated")
    again = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).source("val").images
    assert torch.equal(first, again)  # decoded again, cache rewritten
    assert cache.stat().st_size > 100
    with pytest.raises(ValueError, match=r"21 images as 27x27 squares.*in_memory_max_gb.*in_memory_gpu false"):
        ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True,
                           in_memory_max_gb=1e-6).source("val")
    with pytest.raises(ValueError, match="in_memory_max_gb=0"):
        ImageNetDataModule(root=str(root), in_memory_gpu=True, in_memory_max_gb=0)


def test_in_memory_cache_sees_same_size_edits_and_empty_files(tmp_path):
    """A BMP keeps its byte size when its pixels change: the cache (and the split's content key) must still change;
    an empty cache file is decoded again, like a truncated one."""
    import os

    from PIL import Image

    root = _nonsquare_tree(tmp_path, ext="bmp")
    dm = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True)
    first, key = dm.source("val").images.clone(), dm.content_key("val")
    path = root / "val" / "c0" / "0.bmp"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.new("RGB", Image.open(path).size, (200, 200, 200)).save(path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # also on file systems with coarse timestamps
    assert path.stat().st_size == size
    again = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True)
    assert again.content_key("val") != key and again.source("val").images[0].float().mean() == 200
    assert torch.equal(again.source("val").images[1:], first[1:])
    per_item = ImageNetDataModule(root=str(root), image_size=24)  # per-item split: fingerprinted on request
    assert per_item.content_key("val") == again.content_key("val")
    for cache in (root / ".cache").glob("decoded-*.npy"):
        cache.write_bytes(b"")
    assert torch.equal(ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).source("val").images,
                       again.source("val").images)
    assert DigitsDataModule().content_key("train") is None  # built-in arrays: fixed content


@pytest.mark.parametrize("in_memory", [False, True])
def test_pillow_formats_and_corrupt_files(tmp_path, in_memory):
    root = _nonsquare_tree(tmp_path, ext="bmp")
    dm = ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=in_memory, batch_size=4)
    x = next(iter(dm.val_dataloader()))[0]
    assert x.shape == (8, 3, 16, 16)
    bad = root / "val" / "c1" / "9.bmp"
    bad.write_bytes(b"BM not really a bitmap")
    dm = ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=in_memory, batch_size=4,
                            cache_decoded=False)
    with pytest.raises(ValueError, match=r"cannot decode the image file .*c1/9\.bmp.*remove or replace it"):
        list(dm.val_dataloader())


def test_prepare_data_decodes_once_for_the_other_ranks(tmp_path, monkeypatch):
    """prepare_data (one process per node) writes the decoded cache; a rank's setup then reads it, decoding nothing."""
    from fct_lightning.data import folder

    root = _nonsquare_tree(tmp_path)
    ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).prepare_data()
    assert len(list((root / ".cache").glob("decoded-*.npy"))) == 2  # train and val

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "read_file", no_decoding)
    other_rank = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True)
    other_rank.setup("fit")
    assert len(other_rank.source("train")) == 21 and len(other_rank.source("val")) == 21
    ImageNetDataModule(root=str(root), image_size=24).prepare_data()  # per-item path: nothing to prepare


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    """16-bit PNGs decode to uint16; stored as uint8 they would wrap around instead of being scaled."""
    import numpy as np
    from PIL import Image

    from fct_lightning.data.folder import decode_all, load_image

    a = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)  # up to 59,900
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    want = torch.from_numpy((a >> 8).astype(np.uint8)).expand(3, 20, 30)
    assert torch.equal(load_image(str(path)), want)
    assert torch.equal(decode_all([str(path)], 20, square_for=20)[0], want[:, :, 5:25])


@pytest.mark.parametrize("slow", [False, True])
def test_file_stats_go_to_threads_only_on_slow_storage(tmp_path, monkeypatch, slow):
    """content_key stats every training file: on network storage (each stat a round trip) that is done by
    threads, on a local disk serially; the fingerprint is the same either way."""
    import os
    import threading
    import time

    from fct_lightning.data.base import files_fingerprint, stat_all

    paths = []
    for i in range(700):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(b"x" * (i % 7))
        paths.append(str(p))
    expected = files_fingerprint(paths, tmp_path)
    real_stat, threads = os.stat, set()

    def stat(path, *args, **kwargs):
        threads.add(threading.current_thread().name)
        if slow:
            time.sleep(2e-4)  # a network file system's round trip
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert [s.st_size for s in stat_all(paths)] == [i % 7 for i in range(700)]
    assert files_fingerprint(paths, tmp_path) == expected
    assert any(name.startswith("fct-stat") for name in threads) == slow
