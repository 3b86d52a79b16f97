"""Per-family image transforms (torchvision.transforms.v2 on tensors).

Families:

* ``"digits"``: scikit-learn 8x8 digits, float tensors ``[1, 8, 8]`` in ``[0, 1]``. Training: shift by up to
  1 px (pad + crop), small rotation/scale, light Gaussian noise; the contrastive pipeline (``views >= 2``)
  adds shear, larger rotation/scale/translation, contrast changes, stronger noise and small erasing. No flips
  (a flipped digit is another digit).
* ``"cifar"``: 32 px uint8 tensors ``[3, H, W]``. Training: random crop with 4 px padding + horizontal flip;
  the contrastive pipeline is SimCLR's (random resized crop, flip, colour jitter, grayscale).
  Evaluation: normalisation only (plus a resize when ``image_size`` is not 32).
* ``"imagenet"``: large images (ImageNet, Places-365, VGGFace2) as uint8 tensors. Training:
  ``RandomResizedCrop(image_size)`` + flip (+ colour jitter, grayscale, blur for ``views >= 2``).
  Evaluation: ``Resize(image_size * 256 / 224)`` + ``CenterCrop(image_size)``.

Every pipeline ends with conversion to float32 and normalisation with the family's mean/std (overridable).
A transform maps one image to one view; for ``views > 1`` :func:`build_transforms` returns a
:class:`MultiView` that stacks ``views`` independent draws into ``[views, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

FAMILIES = ("digits", "cifar", "imagenet")

#: Per-channel mean/std used for normalisation, by family / dataset.
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_DEFAULT_STATS = {
    "digits": (DIGITS_MEAN, DIGITS_STD),
    "cifar": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


class MultiView:
    """Apply a single-view transform ``views`` times and stack the results into ``[views, C, H, W]``.

    Args:
        transform: the single-view transform (kept as ``.transform`` so that seeded wrappers can
            re-seed between views).
        views: number of views, >= 1.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], views: int) -> None:
        self.transform = transform
        self.views = views

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])

    def __repr__(self) -> str:
        return f"MultiView(views={self.views}, transform={self.transform!r})"


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _digits(train: bool, strong: bool, size: int) -> list:
    ops: list = []
    if size != 8:
        ops.append(v2.Resize(size, antialias=True))
    if not train:
        return ops
    shift = max(1, round(size / 8))
    if not strong:
        return ops + [
            v2.RandomCrop(size, padding=shift),
            v2.RandomAffine(degrees=10, scale=(0.9, 1.1)),
            v2.GaussianNoise(sigma=0.05),
        ]
    return ops + [
        v2.RandomCrop(size, padding=shift),
        v2.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        v2.GaussianNoise(sigma=0.1),
        v2.RandomErasing(p=0.3, scale=(0.02, 0.12), value=0.0),
    ]


def _cifar(train: bool, strong: bool, size: int) -> list:
    if not train:
        return [] if size == 32 else [v2.Resize(size, antialias=True)]
    if not strong:
        resize = [] if size == 32 else [v2.Resize(size, antialias=True)]
        return resize + [v2.RandomCrop(size, padding=round(size / 8)), v2.RandomHorizontalFlip()]
    return [
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]


def blur_kernel(size: int) -> int:
    """Gaussian-blur kernel of the ``imagenet`` contrastive pipeline: odd, about 10 % of the side (as SimCLR)."""
    return max(3, (size // 10) | 1)


def _imagenet(train: bool, strong: bool, size: int) -> list:
    if not train:
        return [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    ops: list = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if strong:
        kernel = blur_kernel(size)
        ops += [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        ]
    return ops


def build_transforms(
    family: str,
    train: bool,
    views: int = 1,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the transform of one family.

    Args:
        family: one of ``"digits"``, ``"cifar"``, ``"imagenet"``.
        train: training augmentation (True) or the deterministic evaluation transform (False).
        views: 1 for a single image ``[C, H, W]``; ``V >= 2`` selects the contrastive (SimCLR-style)
            augmentation and returns a :class:`MultiView` producing ``[V, C, H, W]``.
        image_size: output side length; default 8 (digits), 32 (cifar), 224 (imagenet).
        mean: per-channel normalisation mean; default the family's.
        std: per-channel normalisation std; default the family's.

    Returns:
        A callable mapping an image tensor (uint8, or float in ``[0, 1]``) to a normalised float32 tensor.

    Raises:
        ValueError: unknown ``family``, ``views < 1`` or ``image_size < 1``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views={views!r} must be an integer >= 1")
    size = image_size if image_size is not None else {"digits": 8, "cifar": 32, "imagenet": 224}[family]
    if size < 1:
        raise ValueError(f"image_size={image_size!r} must be >= 1")
    d_mean, d_std = _DEFAULT_STATS[family]
    strong = views > 1
    builder = {"digits": _digits, "cifar": _cifar, "imagenet": _imagenet}[family]
    ops = builder(train, strong, size) + _finish(mean or d_mean, std or d_std)
    transform = v2.Compose(ops)
    return MultiView(transform, views) if views > 1 else transform
