"""The training augmentation recipes: one frozen description per family and strength, read by both data paths.

The per-item path (:func:`fct_lightning.data.transforms.build_transforms`, one image at a time in the DataLoader
workers) and the batched in-memory path (:class:`fct_lightning.data.memory.InMemoryAugmentedLoader`, whole
batches on the device) both draw their random parameters with :func:`fct_lightning.data.augment.sample_params`
from the :class:`Recipe` that :func:`recipe_for` returns, so they draw from the same distributions.

A recipe's steps always run in this order (each one optional):

1. crop: :class:`PadCrop` (``RandomCrop(size, padding)``, zero fill) or :class:`ResizedCrop`
   (``RandomResizedCrop(size, scale, ratio)``, torchvision's rule: up to 10 draws of area and log-aspect, the
   first box that fits, else the centre crop with the aspect clamped into ``ratio``);
2. horizontal flip with probability ``flip_p``;
3. :class:`Affine` (rotation, scaling, shear, translation);
4. :class:`Jitter` with probability ``p``: brightness, contrast, saturation, hue factors, applied in this fixed
   order (torchvision's ``ColorJitter`` permutes the order per image; a fixed one lets the batched path fold the
   first three into one pass);
5. grayscale with probability ``grayscale_p``;
6. :class:`Blur` (Gaussian, kernel :func:`blur_kernel`) with probability ``p``;
7. additive Gaussian noise of std ``noise_sigma`` (then clipped to ``[0, 1]``);
8. :class:`Erasing` with probability ``p``.

Families (see :data:`RECIPES`): ``digits`` (8x8 grey digits: shifts, affine, noise; never flipped, a flipped digit
is another digit), ``cifar`` (32 px: pad-crop + flip; SimCLR's contrastive recipe) and ``imagenet`` (large images:
RandomResizedCrop + flip; the contrastive recipe adds jitter, grayscale and blur). ``strong`` is the contrastive
recipe of the ``views >= 2`` pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FAMILIES = ("digits", "cifar", "imagenet")


def _check_p(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: a probability in [0, 1]")


def _check_range(owner: str, name: str, value: tuple[float, float], low: float = 0.0) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: (lo, hi) with {low:g} <= lo <= hi")


@dataclass(frozen=True)
class PadCrop:
    """``RandomCrop(size, padding=pad)``: a shift by an integer in ``[-pad, pad]`` per axis, zeros filled in.

    Args:
        fraction: the padding as a fraction of the output side: ``pad = max(1, round(size * fraction))``.
    """

    fraction: float = 1 / 8

    def __post_init__(self) -> None:
        if not self.fraction >= 0:
            raise ValueError(f"PadCrop.fraction={self.fraction!r} is invalid; allowed: a number >= 0")

    def pad(self, size: int) -> int:
        """The padding in pixels for an output side of ``size``."""
        return max(1, round(size * self.fraction))


@dataclass(frozen=True)
class ResizedCrop:
    """``RandomResizedCrop(size, scale, ratio)``: a box of ``scale`` of the area (uniform) and aspect ``ratio``
    (log-uniform), resized to the output side.

    Args:
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's aspect ratio (width / height).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        _check_range("ResizedCrop", "scale", self.scale)
        _check_range("ResizedCrop", "ratio", self.ratio)
        if self.scale[1] <= 0 or self.ratio[0] <= 0:
            raise ValueError(f"ResizedCrop(scale={self.scale}, ratio={self.ratio}) is invalid; allowed: "
                             "scale with hi > 0 and ratio with lo > 0")


@dataclass(frozen=True)
class Affine:
    """A random affine map about the image centre (``RandomAffine``).

    Args:
        degrees: rotation angle drawn from ``[-degrees, degrees]``.
        scale: zoom factor range (uniform).
        translate: shift drawn from ``[-translate, translate]`` of the side, per axis (not rounded to pixels).
        shear: shear angle drawn from ``[-shear, shear]`` degrees.
    """

    degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    shear: float = 0.0

    def __post_init__(self) -> None:
        for name in ("degrees", "translate", "shear"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Affine.{name}={getattr(self, name)!r} is invalid; allowed: a number >= 0")
        _check_range("Affine", "scale", self.scale)


@dataclass(frozen=True)
class Jitter:
    """Colour jitter, applied with probability ``p``: factors ``1 + u``, ``u`` uniform in ``[-s, s]`` for
    brightness, contrast and saturation (strength ``s``), and a hue shift uniform in ``[-hue, hue]`` (fraction of
    the hue circle, as torchvision's ``adjust_hue``). A strength of 0 draws nothing; saturation and hue act on RGB
    images only.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"Jitter.{name}={getattr(self, name)!r} is invalid; allowed: a strength in [0, 1]")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"Jitter.hue={self.hue!r} is invalid; allowed: a shift in [0, 0.5]")
        _check_p("Jitter", "p", self.p)


@dataclass(frozen=True)
class Blur:
    """Gaussian blur with probability ``p``, ``sigma`` drawn uniformly, kernel :func:`blur_kernel` of the side."""

    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_range("Blur", "sigma", self.sigma)
        if self.sigma[0] <= 0:
            raise ValueError(f"Blur.sigma={self.sigma!r} is invalid; allowed: (lo, hi) with 0 < lo <= hi")
        _check_p("Blur", "p", self.p)


@dataclass(frozen=True)
class Erasing:
    """``RandomErasing``: with probability ``p`` a rectangle of ``scale`` of the area (uniform) and aspect ``ratio``
    (height / width, log-uniform) is set to ``value``. Its sides are rounded and clamped to the image (torchvision
    draws again instead, up to 10 times)."""

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = 0.0

    def __post_init__(self) -> None:
        _check_p("Erasing", "p", self.p)
        _check_range("Erasing", "scale", self.scale)
        _check_range("Erasing", "ratio", self.ratio, low=1e-9)


@dataclass(frozen=True)
class Recipe:
    """One training augmentation (the module docstring gives the order of the steps).

    Args:
        name: ``<family>/<weak|strong>``, for messages and cache keys.
        crop: the random crop, or None (the image is only resized to the output side).
        flip_p: probability of a horizontal flip.
        affine: random affine map, or None.
        jitter: colour jitter, or None.
        grayscale_p: probability of turning an RGB image grey (kept with 3 channels).
        blur: Gaussian blur, or None.
        noise_sigma: std of additive Gaussian noise (0 = none).
        erasing: random erasing, or None.
    """

    name: str
    crop: PadCrop | ResizedCrop | None = None
    flip_p: float = 0.0
    affine: Affine | None = None
    jitter: Jitter | None = None
    grayscale_p: float = 0.0
    blur: Blur | None = None
    noise_sigma: float = 0.0
    erasing: Erasing | None = None

    def __post_init__(self) -> None:
        _check_p("Recipe", "flip_p", self.flip_p)
        _check_p("Recipe", "grayscale_p", self.grayscale_p)
        if not self.noise_sigma >= 0:
            raise ValueError(f"Recipe.noise_sigma={self.noise_sigma!r} is invalid; allowed: a std >= 0")


RECIPES: dict[tuple[str, bool], Recipe] = {
    ("digits", False): Recipe("digits/weak", PadCrop(), affine=Affine(10, (0.9, 1.1)), noise_sigma=0.05),
    ("digits", True): Recipe(
        "digits/strong", PadCrop(), affine=Affine(20, (0.8, 1.2), translate=0.1, shear=10),
        jitter=Jitter(brightness=0.4, contrast=0.4, p=0.8), noise_sigma=0.1,
        erasing=Erasing(p=0.3, scale=(0.02, 0.12), ratio=(0.3, 3.3), value=0.0)),
    ("cifar", False): Recipe("cifar/weak", PadCrop(), flip_p=0.5),
    # SimCLR's CIFAR recipe (colour strength 0.5: jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2)
    ("cifar", True): Recipe("cifar/strong", ResizedCrop((0.2, 1.0)), flip_p=0.5,
                            jitter=Jitter(0.4, 0.4, 0.4, 0.1, p=0.8), grayscale_p=0.2),
    ("imagenet", False): Recipe("imagenet/weak", ResizedCrop((0.08, 1.0)), flip_p=0.5),
    ("imagenet", True): Recipe("imagenet/strong", ResizedCrop((0.08, 1.0)), flip_p=0.5,
                               jitter=Jitter(0.4, 0.4, 0.2, 0.1, p=0.8), grayscale_p=0.2,
                               blur=Blur((0.1, 2.0), p=0.5)),
}
"""Every shipped recipe, by ``(family, strong)``."""


def recipe_for(family: str, strong: bool) -> Recipe:
    """The recipe of ``family`` (``strong``: the contrastive one, used for ``views >= 2``).

    Raises:
        ValueError: unknown family (the message lists the allowed ones).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    return RECIPES[(family, bool(strong))]


def blur_kernel(size: int) -> int:
    """Gaussian-blur kernel for an output side of ``size``: odd, about 10 % of the side (as SimCLR), at least 3."""
    return max(3, (size // 10) | 1)


def log_uniform_bounds(ratio: tuple[float, float]) -> tuple[float, float]:
    """``(log lo, log hi)`` of a ratio range, for log-uniform draws."""
    return math.log(ratio[0]), math.log(ratio[1])
