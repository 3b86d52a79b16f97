"""The validation split held out of the training images (``val_fraction``): model selection without the test split."""

import math

import pytest
import torch

from fct_lightning.data import DigitsDataModule, ImageNetDataModule
from fct_lightning.data.holdout import HOLDOUT, holdout_positions
from tests.data.fakes import make_imagefolder


def _labels(loader) -> torch.Tensor:
    return torch.cat([y for _, y, _ in loader])


def test_division_is_per_class_disjoint_and_seed_free():
    full = DigitsDataModule().source("train")
    dm = DigitsDataModule(val_fraction=0.1, seed=0, in_memory_gpu=True)
    train, held = dm.source("train"), dm.source(HOLDOUT)
    assert len(train) + len(held) == len(full)
    for c in range(10):
        n = int((full.targets == c).sum())
        assert int((held.targets == c).sum()) == math.floor(0.1 * n + 0.5)  # half up: 12.5 -> 13
    # the items are the training images themselves, none twice: every image of the full split is in one part
    rows = {tuple(x.flatten().tolist()) for x in full.images}
    parts = [tuple(x.flatten().tolist()) for x in torch.cat([train.images, held.images])]
    assert len(set(parts)) == len(rows) and set(parts) == rows
    # another run seed (another stage of the chain) holds out the same items
    other = DigitsDataModule(val_fraction=0.1, seed=7).source(HOLDOUT)
    assert torch.equal(other.images, held.images)


def test_val_loader_serves_the_holdout_and_training_never_sees_it():
    dm = DigitsDataModule(val_fraction=0.2, batch_size=64, in_memory_gpu=True, augment=False)
    dm.setup("fit")
    held = dm.source(HOLDOUT)
    val = [x for x, _, _ in dm.val_dataloader()]
    assert dm.val_split == HOLDOUT and sum(len(x) for x in val) == len(held)
    assert torch.equal(_labels(dm.val_dataloader()), held.targets)
    seen = {tuple(x.flatten().tolist()) for b, _, _ in dm.train_dataloader() for x in b}
    assert seen.isdisjoint({tuple(x.flatten().tolist()) for x in torch.cat(val)})
    # the test split is the test/predict loaders' (the final table), untouched
    assert len(_labels(dm.test_dataloader())) == len(DigitsDataModule().source("test"))


def test_without_fraction_val_is_the_evaluation_split_and_holdout_is_refused():
    dm = DigitsDataModule()
    assert dm.val_split == "test"
    with pytest.raises(ValueError, match=r"'holdout' exists only with val_fraction > 0 \(--data.val_fraction"):
        dm.source(HOLDOUT)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1"])
def test_bad_fraction_names_the_fix(bad):
    with pytest.raises(ValueError, match=r"val_fraction=.*float in \[0, 1\)"):
        DigitsDataModule(val_fraction=bad)


def test_caches_of_another_division_have_another_key(tmp_path):
    make_imagefolder(tmp_path, ["a", "b"], {"train": 10, "val": 2}, size=8)
    keys = {f: ImageNetDataModule(root=str(tmp_path), val_fraction=f).content_key("train") for f in (0.0, 0.1, 0.3)}
    assert len(set(keys.values())) == 3
    dm = ImageNetDataModule(root=str(tmp_path), val_fraction=0.3, image_size=8)
    train, held = dm.source("train"), dm.source(HOLDOUT)  # lazily decoded files: parts keep their paths
    assert len(train) == 14 and len(held) == 6 and set(train.paths).isdisjoint(held.paths)
    image, label = held[0]
    assert label == int(held.targets[0]) and image.shape[0] == 3


def test_an_in_memory_split_is_held_once(tmp_path):
    """The divided in-memory split replaces the whole one (not kept beside it); its fingerprint stays known."""
    dm = DigitsDataModule(val_fraction=0.1)
    dm.source("train")
    assert "train" not in dm._raw
    key = dm.content_key("train")
    assert key == "None|train of val_fraction=0.1" and "train" not in dm._raw


def test_tiny_classes_keep_a_training_item():
    pos = holdout_positions(torch.tensor([0, 0, 1, 2, 2, 2]), 0.9)
    kept = set(range(6)) - set(pos.tolist())
    assert {0, 1, 2} <= {[0, 0, 1, 2, 2, 2][i] for i in kept}
