"""ImageFolder datamodules (ImageNet, Places-365, VGGFace2) on generated trees."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fct_lightning.data import (
    DigitsDataModule,
    ImageNetDataModule,
    Places365DataModule,
    VGGFace2DataModule,
)
from fct_lightning.data.image_tree import order_classes
from tests.data.fakes import make_imagefolder, save_image


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
    xs, ys, idx = zip(*dm.val_dataloader(), strict=True)
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
    from fct_lightning.data import decode

    root = _nonsquare_tree(tmp_path)
    ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).prepare_data()
    assert len(list((root / ".cache").glob("decoded-*.npy"))) == 2  # train and val

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode, "read_image_file", no_decoding)
    other_rank = ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True)
    other_rank.setup("fit")
    assert len(other_rank.source("train")) == 21 and len(other_rank.source("val")) == 21
    ImageNetDataModule(root=str(root), image_size=24).prepare_data()  # per-item path: nothing to prepare


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    """16-bit PNGs decode to uint16; stored as uint8 they would wrap around instead of being scaled."""
    import numpy as np
    from PIL import Image

    from fct_lightning.data.decode import decode_all, load_image

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

    from fct_lightning.data.fingerprint import files_fingerprint, stat_all

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


# ----- decoding: deep images, EXIF orientation, named errors ------------------------------------------------------


def test_deep_pillow_images_are_scaled_not_clipped(tmp_path):
    """16-bit / 32-bit / float TIFF and 16-bit PGM (read by Pillow) are scaled to 8 bits like 16-bit PNGs, not clipped
    to 0 or 255 by ``convert("RGB")``; 8-bit modes decode exactly as before."""
    from fct_lightning.data.decode import decode_all, load_image

    def gray(t):
        return t.expand(3, *t.shape[-2:]) if t.ndim == 2 else t

    a16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)  # up to 59,900
    want16 = torch.from_numpy((a16 >> 8).astype(np.uint8))
    png, tif = save_image(tmp_path / "d.png", a16), save_image(tmp_path / "d.tif", a16)
    pgm = tmp_path / "d.pgm"
    pgm.write_bytes(b"P5\n30 20\n65535\n" + a16.astype(">u2").tobytes())
    for p in (png, tif, pgm):  # the same pixels through torchvision (PNG) and Pillow (TIFF, PGM)
        assert torch.equal(load_image(str(p)), gray(want16)), p.name
    squares = decode_all([str(tif), str(pgm)], 20, square_for=20)
    assert torch.equal(squares, gray(want16)[:, :, 5:25].expand(2, 3, 20, 20))
    a12 = (np.arange(20 * 30).reshape(20, 30) * 6).astype(np.uint16)  # a 12-bit PGM (maxval 4095)
    pgm12 = tmp_path / "d12.pgm"
    pgm12.write_bytes(b"P5\n30 20\n4095\n" + a12.astype(">u2").tobytes())
    got = load_image(str(pgm12))[0].int()
    want = torch.from_numpy(np.rint(a12.astype(np.float64) * 255 / 4095)).int()
    assert (got - want).abs().max() <= 1 and got.max() > 200

    ramp = np.linspace(-0.25, 1, 20 * 30, dtype=np.float32).reshape(20, 30)  # floats in [0, 1], negatives clipped
    f01 = save_image(tmp_path / "f01.tif", ramp)
    assert torch.equal(load_image(str(f01)), gray(torch.from_numpy(np.rint(ramp.clip(0) * 255).astype(np.uint8))))
    half = save_image(tmp_path / "half.tif", np.full((4, 5), 0.5, np.float32))
    assert load_image(str(half)).float().mean() == 128
    big = save_image(tmp_path / "fbig.tif", ramp * 1000)  # other ranges: scaled by the maximum
    assert torch.equal(load_image(str(big)), gray(torch.from_numpy(np.rint(ramp.clip(0) * 255).astype(np.uint8))))
    i32 = (np.arange(20 * 30).reshape(20, 30) * 3000 - 1000).astype(np.int32)  # beyond 16 bits: by the maximum
    want = np.rint(i32.clip(0) * 255 / i32.max()).astype(np.uint8)
    assert torch.equal(load_image(str(save_image(tmp_path / "i32.tif", i32))), gray(torch.from_numpy(want)))
    small = (a16 // 2).astype(np.int32)  # 32-bit integers that fit in 16 bits: as 16 bits
    assert torch.equal(load_image(str(save_image(tmp_path / "i16.tif", small))),
                       gray(torch.from_numpy((small >> 8).astype(np.uint8))))

    rgb = (np.random.default_rng(0).random((9, 7, 3)) * 255).astype(np.uint8)
    for mode in ("L", "P", "RGBA", "CMYK", "1"):  # 8-bit (and 1-bit) modes: exactly convert("RGB")
        p = tmp_path / f"m_{mode}.tif"
        Image.fromarray(rgb).convert(mode).save(p)
        with Image.open(p) as im:
            want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(load_image(str(p)), want), mode


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    """A phone portrait (stored landscape + Orientation 6) decodes as displayed: per item (torchvision for JPEG and
    PNG, Pillow for WebP with EXIF and TIFF) and in memory (batched JPEG decoding), with identical pixels."""
    from torchvision.io import decode_image

    from fct_lightning.data.decode import (
        decode_all,
        load_image,
        read_image_file,
        square_for_eval,
    )

    a = (np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)  # stored 8 high, 12 wide
    shown = torch.rot90(torch.from_numpy(a).permute(2, 0, 1), -1, (1, 2))  # rotated 90 degrees clockwise
    lossless = [save_image(tmp_path / "o.png", a, 6), save_image(tmp_path / "o.webp", a, 6, lossless=True),
                save_image(tmp_path / "o.tif", a, 6), save_image(tmp_path / "o.bmp", a)]
    for p in lossless[:3]:
        assert torch.equal(load_image(str(p)), shown), p.name
    assert torch.equal(load_image(str(lossless[3])), torch.from_numpy(a).permute(2, 0, 1))  # no EXIF: unchanged
    jpgs = [save_image(tmp_path / f"o{i}.jpg", a, o, quality=95) for i, o in enumerate((6, 1, 3, 8))]
    raw = decode_image(read_image_file(str(jpgs[0])))
    assert torch.equal(load_image(str(jpgs[0])), torch.rot90(raw, -1, (1, 2)))
    assert load_image(str(jpgs[0])).shape == (3, 12, 8) and load_image(str(jpgs[1])).shape == (3, 8, 12)
    for files in (jpgs, jpgs + lossless):  # batched JPEG decoding, and per file
        stored = decode_all([str(p) for p in files], 9, square_for=8)
        for p, s in zip(files, stored, strict=True):
            assert torch.equal(s, square_for_eval(load_image(str(p)), 9, 8)), p.name


def test_decode_errors_name_the_file(tmp_path, monkeypatch):
    """Empty files and images over Pillow's pixel limit stop the run with the path; names that are not valid UTF-8
    (a Latin-1 zip) are read, fingerprinted and decoded."""
    import hashlib
    import os
    import shutil

    from fct_lightning.data.decode import load_image
    from fct_lightning.data.fingerprint import files_fingerprint

    root = _nonsquare_tree(tmp_path / "t")
    latin1 = root / "train" / "c0" / os.fsdecode(b"caf\xe9.png")
    shutil.copy(root / "train" / "c0" / "0.png", latin1)
    for in_memory in (False, True):
        dm = ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=in_memory, batch_size=8)
        src = dm.source("train")
        assert len(src) == 22 and str(latin1) in getattr(src, "paths", [str(latin1)])
        assert len(torch.cat([b[0] for b in dm.train_dataloader()])) == 22 and dm.content_key("train")
    paths = [str(root / "val" / "c0" / "0.png"), str(root / "val" / "c1" / "caf\u00e9 \u00fc.png")]
    shutil.copy(paths[0], paths[1])
    old_formula = hashlib.sha1()  # valid names keep the fingerprint they had (UTF-8 bytes = fsencode bytes)
    for p in paths:
        st = os.stat(p)
        old_formula.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert files_fingerprint(paths, root) == old_formula.hexdigest()
    Path(paths[1]).unlink()

    (root / "val" / "c1" / "zero.png").write_bytes(b"")
    for in_memory in (False, True):
        dm = ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=in_memory, batch_size=8,
                                cache_decoded=False)
        with pytest.raises(ValueError, match=r"cannot decode the image file .*c1/zero\.png.*empty.*remove or replace"):
            list(dm.val_dataloader())

    bomb = save_image(tmp_path / "scan.tif", np.zeros((20, 30), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels > 2x the limit: Pillow raises
    with pytest.raises(ValueError, match=r"scan\.tif.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_image(str(bomb))


# ----- listing: recursion, symlinks, hidden files, empty classes --------------------------------------------------


def test_listing_walks_subfolders_and_symlinks_and_skips_hidden_files(tmp_path, caplog):
    import os

    from fct_lightning.data import ImageFolderDataModule

    rng = np.random.default_rng(0)

    def img(path, fmt=None):
        return save_image(path, (rng.random((10, 14, 3)) * 255).astype(np.uint8), **({"format": fmt} if fmt else {}))

    root = tmp_path / "tree"
    for split in ("train", "val"):
        s = root / split
        img(s / "plain" / "1.png")
        img(s / "plain" / "0.jpg")
        (s / "plain" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
        (s / "plain" / ".DS_Store").write_bytes(b"Bud1")
        (s / "plain" / "notes.txt").write_text("not an image")
        (s / "plain" / "photo.heic").write_bytes(b"....ftypheic")
        img(s / "nested" / "b" / "2.jpg")
        img(s / "nested" / "a" / "deeper" / "0.jpg")
        img(s / "nested" / "a" / "1.jpg")
        img(s / "nested" / "0.jpg")
        img(s / "nested" / ".hidden" / "x.jpg")
        img(s / "gifs" / "0.gif")
        img(s / "gifs" / "1.JFIF", "JPEG")
        frames = [Image.fromarray((rng.random((10, 14, 3)) * 255).astype(np.uint8)) for _ in range(2)]
        frames[0].save(s / "gifs" / "anim.gif", save_all=True, append_images=frames[1:])
        img(tmp_path / "elsewhere" / split / "x.jpg")
        img(tmp_path / "elsewhere" / split / "dir" / "y.png")
        (s / "linked").mkdir()
        os.symlink(tmp_path / "elsewhere" / split / "x.jpg", s / "linked" / "x.jpg")
        os.symlink(tmp_path / "elsewhere" / split / "dir", s / "linked" / "dir")
        os.symlink(".", s / "linked" / "loop")  # a symlink loop: walked once
        os.symlink("/nonexistent/gone.jpg", s / "linked" / "gone.jpg")
        os.symlink("/nonexistent/share", s / "linked" / "unmounted")
    with caplog.at_level("WARNING", logger="fct_lightning.data.image_tree"):
        dm = ImageFolderDataModule(root=str(root), image_size=8, batch_size=4)
        src = dm.source("train")
    assert dm.class_names == ["gifs", "linked", "nested", "plain"]
    rel = [os.path.relpath(p, root / "train") for p in src.paths]
    assert rel == ["gifs/0.gif", "gifs/1.JFIF", "gifs/anim.gif", "linked/dir/y.png", "linked/x.jpg",
                   "nested/0.jpg", "nested/a/1.jpg", "nested/a/deeper/0.jpg", "nested/b/2.jpg",
                   "plain/0.jpg", "plain/1.png"]
    assert src.targets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert all(src[i][0].shape == (3, 10, 14) for i in range(len(src)))  # the animated GIF: its first frame
    warned = caplog.text
    assert "gone.jpg (broken symlink)" in warned and "unmounted (broken symlink)" in warned
    assert "photo.heic" in warned and "._0.jpg" not in warned and "notes.txt" not in warned
    mem = ImageFolderDataModule(root=str(root), image_size=8, in_memory_gpu=True)
    assert len(mem.source("train")) == 11 and len(mem.source("val")) == 11  # hidden garbage files not decoded


def test_empty_train_class_folders_are_refused(tmp_path):
    import os

    from fct_lightning.data import ImageFolderDataModule

    make_imagefolder(tmp_path, ["a", "b", "c", "d"], ("train", "val"), per_class=1, size=8)
    for split in ("train", "val"):
        for f in (tmp_path / split / "b").iterdir():
            f.unlink()
        (tmp_path / split / "b" / "._0.jpg").write_bytes(b"not an image")
        for f in (tmp_path / split / "d").iterdir():
            f.unlink()
        os.symlink("/nonexistent/0.jpg", tmp_path / split / "d" / "0.jpg")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8)
    assert len(dm.source("val")) == 2  # an evaluation split may lack a class
    with pytest.raises(ValueError, match=r"train: class folders \['b', 'd'\] \(2 of 4\) hold no images"):
        dm.source("train")


def test_named_dataset_dir_wins_over_a_tree_at_the_root(tmp_path, caplog):
    """A data root holding the user's own ``train/`` and ``imagenet/train/``: ``--dataset imagenet`` uses the latter
    (with a warning naming both); ``--dataset folder`` still reads a tree at the root."""
    from fct_lightning.data import ImageFolderDataModule

    make_imagefolder(tmp_path, ["c0", "c1"], ("train", "val"), per_class=1, size=8)
    make_imagefolder(tmp_path / "imagenet", ["n01", "n02", "n03"], ("train", "val"), per_class=1, size=8)
    with caplog.at_level("WARNING", logger="fct_lightning.data.image_tree"):
        dm = ImageNetDataModule(root=str(tmp_path))
    assert dm.dataset_dir == tmp_path / "imagenet" and dm.class_names == ["n01", "n02", "n03"]
    assert str(tmp_path / "imagenet") in caplog.text and str(tmp_path / "train") in caplog.text
    assert ImageFolderDataModule(root=str(tmp_path)).class_names == ["c0", "c1"]
    assert ImageNetDataModule(root=str(tmp_path / "imagenet")).class_names == ["n01", "n02", "n03"]
    assert Places365DataModule(root=str(tmp_path)).dataset_dir == tmp_path


def test_class_names_bom_unicode_forms_and_numeric_ties(tmp_path):
    import unicodedata

    from fct_lightning.data import ImageFolderDataModule

    assert order_classes(["1", "01", "2"]) == order_classes(["01", "1", "2"]) == ["01", "1", "2"]
    assert order_classes(["10", "9", "\u00b2"]) == ["10", "9", "\u00b2"]  # '²' is a digit, not a number: by name
    make_imagefolder(tmp_path / "bom", ["b", "a"], ("train", "val"), per_class=1, size=8)
    (tmp_path / "bom" / "classes.txt").write_bytes(b"\xef\xbb\xbfb\r\na\r\n")  # Windows Notepad
    assert ImageFolderDataModule(root=str(tmp_path / "bom")).class_names == ["b", "a"]
    nfd, nfc = unicodedata.normalize("NFD", "caf\u00e9"), unicodedata.normalize("NFC", "caf\u00e9")
    make_imagefolder(tmp_path / "nfd", [nfd, "z"], ("train",), per_class=2, size=8)  # copied from macOS
    make_imagefolder(tmp_path / "nfd", [nfc, "z"], ("val",), per_class=1, size=8)
    dm = ImageFolderDataModule(root=str(tmp_path / "nfd"))
    assert dm.class_names == [nfc, "z"] and dm.source("val").targets.tolist() == [0, 1]
    assert dm.source("train").targets.tolist() == [0, 0, 1, 1]
    make_imagefolder(tmp_path / "twins", [nfd, nfc], ("train", "val"), per_class=1, size=8)
    with pytest.raises(ValueError, match="different Unicode forms"):
        ImageFolderDataModule(root=str(tmp_path / "twins"))


# ----- decoded-image cache: decoder version, stale files ----------------------------------------------------------


def test_cache_key_has_the_decoder_version_and_old_caches_are_removed(tmp_path, monkeypatch):
    import os
    import time

    from fct_lightning.data import decode

    root = _nonsquare_tree(tmp_path)
    cache = root / ".cache"
    paths = [str(p) for p in sorted((root / "val" / "c0").iterdir())]
    decode.decode_all(paths, 9, cache, square_for=8)
    monkeypatch.setattr(decode, "DECODER_VERSION", decode.DECODER_VERSION + 1)  # a decoder giving other pixels
    decode.decode_all(paths, 9, cache, square_for=8)
    assert len(list(cache.glob("decoded-s9c8-7-*.npy"))) == 2  # a new key, not the old cache
    for f in cache.iterdir():
        f.unlink()

    ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).prepare_data()  # train and val
    ImageNetDataModule(root=str(root), image_size=16, in_memory_gpu=True).source("train")
    legacy = cache / f"decoded-21-{'0' * 20}.npy"  # written before the decoder version was in the key
    dead = cache / f"decoded-train-s27c24-21-{'1' * 20}.npy.999999999.tmp"  # a writer killed 2 hours ago
    live = cache / f"decoded-val-s27c24-21-{'2' * 20}.npy.999999998.tmp"  # one writing now
    foreign = cache / "notes.txt"
    for f in (legacy, dead, live, foreign):
        f.write_bytes(b"x")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    before = {f.name for f in cache.glob("decoded-*.npy")} - {legacy.name}
    assert len(before) == 3
    folder_c0 = root / "train" / "c0"
    (folder_c0 / "added.png").write_bytes((folder_c0 / "0.png").read_bytes())  # an edit: the train cache changes
    ImageNetDataModule(root=str(root), image_size=24, in_memory_gpu=True).source("train")
    after = {f.name for f in cache.iterdir()}
    new = [n for n in after if n.startswith("decoded-train-s27c24-22-") and n.endswith(".npy")]
    assert len(new) == 1
    kept = {n for n in before if not n.startswith("decoded-train-s27c24-")}  # other split, other size
    assert after == kept | set(new) | {live.name, foreign.name}


def test_splits_in_same_named_folders_keep_their_own_decoded_caches(tmp_path):
    """train_dir a/images and eval_dir b/images: each split's cache is its own, not the other's 'older version'."""
    from fct_lightning.data.folder import FolderDataModule

    for split in ("a/images", "b/images"):
        make_imagefolder(tmp_path / "tmp" / split.replace("/", "_"), ["x", "y"], ["s"], per_class=2, size=40)
        target = tmp_path / "ds" / split
        target.parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tmp" / split.replace("/", "_") / "s").rename(target)

    def cached():
        dm = FolderDataModule(root=str(tmp_path / "ds"), train_dir="a/images", eval_dir="b/images",
                              in_memory_gpu=True, image_size=32, batch_size=2)
        dm.setup("fit")
        return sorted(p.name for p in (tmp_path / "ds" / ".cache").glob("*.npy"))

    first = cached()
    assert len(first) == 2 and cached() == first
