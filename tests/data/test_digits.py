"""DigitsDataModule: fixed stratified split, class subsets, views, seeded augmentation."""

import numpy as np
import pytest
import torch

from fct_lightning.data import DigitsDataModule


def test_split_is_fixed_stratified_and_ignores_seed():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=123)
    ta, tb = a.source("train"), b.source("train")
    assert len(ta) == 1257 and len(a.source("test")) == 540
    assert torch.equal(ta.images, tb.images) and torch.equal(ta.targets, tb.targets)
    tr = np.bincount(ta.targets.numpy(), minlength=10) / len(ta)
    te = np.bincount(a.source("test").targets.numpy(), minlength=10) / 540
    assert np.abs(tr - te).max() < 0.01
    assert a.source("train").images.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(ta.images.min()) and float(ta.images.max()) <= 1.0


def test_attributes_and_eval_all_classes():
    dm = DigitsDataModule(train_classes=[7, 3], batch_size=32)
    assert (dm.name, dm.num_classes, dm.in_channels, dm.image_size) == ("digits", 10, 1, 8)
    assert dm.class_names == [str(i) for i in range(10)]
    assert dm.train_class_ids == [3, 7]
    labels = torch.cat([b[1] for b in dm.val_dataloader()])
    assert sorted(labels.unique().tolist()) == list(range(10))
    x, _y, idx = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert idx.tolist() == list(range(64))  # in order, index = position


def test_train_subset_indices_are_positions():
    dm = DigitsDataModule(train_classes=4, batch_size=50)
    seen_idx, seen_y = [], []
    for _x, y, idx in dm.train_dataloader():
        seen_idx += idx.tolist()
        seen_y += y.tolist()
    ds = dm.dataset("train", dm.train_class_ids)
    assert sorted(seen_idx) == list(range(len(ds)))
    assert set(seen_y) == {0, 1, 2, 3}
    for i, y in zip(seen_idx[:20], seen_y[:20], strict=True):
        assert int(ds.targets[i]) == y


def test_views2_shape_and_views_differ():
    dm = DigitsDataModule(views=2, batch_size=8)
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 1, 8, 8)
    assert not torch.allclose(x[:, 0], x[:, 1])


def test_no_augment_is_eval_transform():
    dm = DigitsDataModule(augment=False, batch_size=4)
    ds = dm.dataset("train", augment=False)
    x0, _, _ = ds[0]
    assert torch.equal(x0, ds[0][0])


@pytest.mark.parametrize(("fraction", "first"), [(0.5, 5), (0.35, 3), (1.0, 10), (0.01, 1)])
def test_train_classes_as_a_fraction(fraction, first):
    """A fraction takes the first floor(f * num_classes) classes, at least one (for trees of unknown size)."""
    assert DigitsDataModule(train_classes=fraction).train_class_ids == list(range(first))


@pytest.mark.parametrize(("fraction", "first"), [(0.29, 29), (0.57, 57), (0.58, 58), (0.999, 99)])
def test_fraction_is_floored_as_a_decimal(fraction, first):
    """0.29 * 100 is 28.999999999999996 in binary floating point: still the first 29 of 100 classes."""
    from fct_lightning.data.base import check_class_list

    assert check_class_list(fraction, 100, "train_classes") == list(range(first))


@pytest.mark.parametrize("kwargs, match", [
    ({"train_classes": 11}, "train_classes=11"),
    ({"train_classes": 0}, "train_classes=0"),
    ({"train_classes": [0, 10]}, r"train_classes=\[0, 10\].*out of range"),
    ({"train_classes": [1, 1]}, "duplicate"),
    ({"train_classes": []}, "train_classes"),
    ({"train_classes": 1.5}, r"train_classes=1.5: a fraction of the classes must be in \(0, 1\]"),
    ({"train_classes": 0.0}, "a fraction"),
    ({"views": 0}, "views=0"),
    ({"eval_split": "val"}, r"eval_split='val'.*allowed"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match=r"split='validation'.*allowed"):
        DigitsDataModule().eval_dataloader("validation")
