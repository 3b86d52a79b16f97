"""ImageFolder datamodules (ImageNet, Places-365, VGGFace2) on generated trees."""

import pytest
import torch

from fct_lightning.data import (
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
