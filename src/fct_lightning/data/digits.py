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

    Args:
        root: unused (the data ships with scikit-learn); kept for a uniform interface.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size; None = ``2 * batch_size``.
        num_workers: DataLoader workers.
        train_classes: None = all, int N = digits ``0..N-1``, list = those digits.
        views: 1, or V >= 2 contrastive views.
        eval_split: ``"test"`` (or ``"train"``).
        augment: training augmentation (shift by up to 1 px, small affine, noise).
        seed: training shuffle seed.
        pin_memory: None = when CUDA is available.
        persistent_workers: keep workers between epochs when ``num_workers > 0``.
        image_size: output side (default 8; other sizes resize).
        in_memory_gpu: batched augmentation from one tensor on the GPU.
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

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_classes: int | float | list[int] | None = None,  # noqa: PYI041 (int = a count, float = a fraction)
        views: int = 1,
        eval_split: str = "test",
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_size: int | None = None,
        in_memory_gpu: bool = False,
    ) -> None:
        super().__init__(
            root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            train_classes=train_classes, views=views, eval_split=eval_split, augment=augment, seed=seed,
            pin_memory=pin_memory, persistent_workers=persistent_workers, image_size=image_size,
            in_memory_gpu=in_memory_gpu,
        )

    def _load_split(self, split: str) -> TensorImages:
        x, y = _digits_splits()[split]
        return TensorImages(torch.tensor(x).unsqueeze(1), torch.tensor(y))
