"""Per-item image transforms: the training augmentation of each family's recipe, and the evaluation transforms.

Training (:class:`Augment`): the family's :class:`~fct_lightning.data.recipes.Recipe` (``views >= 2``: the strong,
contrastive one), drawn by :func:`~fct_lightning.data.augment.augment_item` from the same sampler and kernels as
the batched in-memory path; see :mod:`fct_lightning.data.recipes` for what each family does.

Evaluation (torchvision.transforms.v2 on tensors):

* ``"digits"`` (``[1, 8, 8]`` floats in ``[0, 1]``) and ``"cifar"`` (32 px uint8): nothing (plus a resize when
  ``image_size`` is not the stored side);
* ``"imagenet"`` (large images: ImageNet, Places-365, VGGFace2): ``Resize(image_size * 256 / 224)`` +
  ``CenterCrop(image_size)``.

Every pipeline ends with conversion to float32 and normalisation with the family's mean/std (overridable).
A transform maps one image to one view; for ``views > 1`` :func:`build_transforms` returns a
:class:`MultiView` that stacks ``views`` independent draws into ``[views, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from fct_lightning.data.augment import augment_item
from fct_lightning.data.recipes import FAMILIES, Recipe, recipe_for

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


def center_offset(stored: int, size: int) -> int:
    """Top/left offset of a ``size`` centre crop of a ``stored`` side, rounded as torchvision's ``CenterCrop``."""
    return round((stored - size) / 2.0)


class Augment:
    """Per-item training augmentation: ``recipe`` at output side ``size``, then normalisation.

    Args:
        recipe: the augmentation (:func:`~fct_lightning.data.recipes.recipe_for`).
        size: output side.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(self, recipe: Recipe, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.recipe, self.size = recipe, size
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return v2.functional.normalize(augment_item(image, self.recipe, self.size), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Augment({self.recipe.name}, size={self.size}, mean={self.mean}, std={self.std})"


def _eval_ops(family: str, size: int) -> list:
    stored = {"digits": 8, "cifar": 32}.get(family)
    if stored is not None:
        return [] if size == stored else [v2.Resize(size, antialias=True)]
    return [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]


def build_transforms(
    family: str,
    train: bool,
    views: int = 1,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    recipe: Recipe | None = None,
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
        recipe: the training augmentation; None = the family's (:func:`~fct_lightning.data.recipes.recipe_for`,
            strong for ``views >= 2``).

    Returns:
        A callable mapping an image tensor (uint8, or float in ``[0, 1]``) to a normalised float32 tensor.

    Raises:
        ValueError: unknown ``family``, ``views < 1`` or ``image_size < 1``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views={views!r} must be an integer >= 1")
    size = image_size if image_size is not None else {"digits": 8, "cifar": 32, "imagenet": 224}[family]
    if size < 1:
        raise ValueError(f"image_size={image_size!r} must be >= 1")
    d_mean, d_std = _DEFAULT_STATS[family]
    mean, std = list(mean or d_mean), list(std or d_std)
    if train:
        transform = Augment(recipe or recipe_for(family, views > 1), size, mean, std)
    else:
        transform = v2.Compose([*_eval_ops(family, size), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(mean, std)])
    return MultiView(transform, views) if views > 1 else transform
