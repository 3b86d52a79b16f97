"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), embedded and offline.

Images are ``[1, 8, 8]`` float tensors scaled to ``[0, 1]`` (pixel / 16), normalised by the transforms.
The train/test split is fixed and stratified: ``train_test_split(test_size=0.3, stratify=y, random_state=0)``
(1,257 train / 540 test items); it does not depend on ``seed``. Class index = digit value.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from fct_lightning.data.base import RetrievalDataModule, TensorImages
from fct_lightning.data.transforms import DIGITS_MEAN, DIGITS_STD

TEST_SIZE = 0.3
SPLIT_RANDOM_STATE = 0


@lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_RANDOM_STATE)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


class DigitsDataModule(RetrievalDataModule):
    """scikit-learn digits: 1x8x8 grey images, 10 classes, fixed stratified 70/30 split.

    Takes the arguments of :class:`~fct_lightning.data.base.RetrievalDataModule` (``root`` is unused: the data
    ships with scikit-learn); ``train_classes`` N = digits ``0..N-1``.
    """

    name = "digits"
    family = "digits"
    in_channels = 1
    default_image_size = 8
    mean = DIGITS_MEAN
    std = DIGITS_STD
    supports_in_memory = True
    num_classes = 10
    class_names: ClassVar[list[str]] = [str(d) for d in range(10)]

    def _load_split(self, split: str) -> TensorImages:
        x, y = _digits_splits()[split]
        return TensorImages(torch.tensor(x).unsqueeze(1), torch.tensor(y))
