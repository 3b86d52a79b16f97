"""Training augmentation from a :class:`~fct_lightning.data.recipes.Recipe`: one sampler, one set of kernels.

:func:`sample_params` draws every random parameter of a recipe for ``n`` images; :func:`apply_params` applies
them with the batched kernels of :mod:`fct_lightning.data.kernels`. The two data paths are thin wrappers:

* :func:`augment_batch`: a whole batch on its device, from a ``torch.Generator`` (the in-memory loader);
* :func:`augment_item`: one image as a batch of one, from the global torch generator (the per-item transform in
  the DataLoader workers). The one difference: a :class:`~fct_lightning.data.recipes.ResizedCrop` of one image
  is cut from the full-resolution image and resized with antialiasing (torchvision's ``resized_crop``), since a
  photo may be many times the output side; the batched path resamples the (stored, about output-sized) images
  bilinearly in one ``grid_sample``, border padded.

Draws are made in the order of the recipe's steps (crop, flip, affine, jitter, grayscale, blur, noise, erasing),
each with as many numbers per image whatever the others, so a seeded batch is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from fct_lightning.data import kernels as K
from fct_lightning.data.recipes import PadCrop, Recipe, ResizedCrop, blur_kernel, log_uniform_bounds

CROP_ATTEMPTS = 10
"""Draws of area and aspect per :class:`~fct_lightning.data.recipes.ResizedCrop` box before the centre-crop
fallback (torchvision's number)."""


@dataclass
class Params:
    """Random parameters of one recipe for ``n`` images: tensors with ``n`` rows on one device, None for a step the
    recipe does not have.

    Attributes:
        offset: :class:`~fct_lightning.data.recipes.PadCrop` offsets ``(oy, ox)`` ``[n, 2]`` in ``[0, 2 pad]``.
        box: :class:`~fct_lightning.data.recipes.ResizedCrop` boxes ``(top, left, height, width)`` ``[n, 4]`` in
            input pixels.
        flip: horizontal flips ``[n]`` (bool).
        angle, scale, shear: affine rotation (degrees), zoom factor and shear (degrees), ``[n]`` each.
        translate: affine shift ``[n, 2]`` in normalised coordinates (2 = the whole side).
        jitter_on: images that get the colour jitter ``[n]`` (bool).
        brightness, contrast, saturation: jitter factors ``[n]`` (1 where off or not drawn).
        hue: hue shifts ``[n]`` (0 where off), or None without hue.
        grey: images turned grey ``[n]`` (bool).
        blur_on, sigma: blurred images ``[n]`` (bool) and their ``sigma`` ``[n]``.
        noise: standard normals ``[n, C, size, size]`` (scaled by the recipe's ``noise_sigma``).
        erase_on, erase_box: erased images ``[n]`` (bool) and their rectangles ``(top, left, height, width)``.
    """

    offset: torch.Tensor | None = None
    box: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    angle: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shear: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    jitter_on: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    hue: torch.Tensor | None = None
    grey: torch.Tensor | None = None
    blur_on: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    erase_on: torch.Tensor | None = None
    erase_box: torch.Tensor | None = None


def _uniform(shape: int | tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo


def resized_crop_boxes(n: int, height: int, width: int, crop: ResizedCrop, gen: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
    """``n`` boxes ``(top, left, h, w)`` ``[n, 4]`` (float holding integers) of a ``height x width`` image, drawn by
    torchvision's ``RandomResizedCrop.get_params`` rule: area ``scale`` (uniform) of the image's and aspect ``ratio``
    (log-uniform), sides rounded; the first of :data:`CROP_ATTEMPTS` draws that fits, else the whole image
    centre-cropped to the nearest allowed aspect; then a uniform integer position."""
    frac = _uniform((n, CROP_ATTEMPTS), *crop.scale, gen, device)
    aspect = torch.exp(_uniform((n, CROP_ATTEMPTS), *log_uniform_bounds(crop.ratio), gen, device))
    area = float(height * width)
    w = torch.sqrt(area * frac * aspect).round()
    h = torch.sqrt(area * frac / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)
    top = (torch.rand(n, generator=gen, device=device) * (height - h + 1)).floor()  # rand < 1: top <= height - h
    left = (torch.rand(n, generator=gen, device=device) * (width - w + 1)).floor()
    if device.type != "cpu" or not bool(found.all()):  # (on an accelerator the check would cost a host sync)
        in_ratio = width / height
        if in_ratio < crop.ratio[0]:
            fw, fh = width, round(width / crop.ratio[0])
        elif in_ratio > crop.ratio[1]:
            fw, fh = round(height * crop.ratio[1]), height
        else:
            fw, fh = width, height
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=h.dtype, device=device)
        box = torch.stack([top, left, h, w], 1)
        return torch.where(found.view(n, 1), box, fallback)
    return torch.stack([top, left, h, w], 1)


def _factor(strength: float, on: torch.Tensor, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Jitter factors ``1 + u``, ``u`` uniform in ``[-strength, strength]`` where ``on``, else 1; nothing drawn for a
    strength of 0."""
    if strength <= 0:
        return torch.ones(len(on), device=device)
    return 1 + on.float() * _uniform(len(on), -strength, strength, gen, device)


def sample_params(recipe: Recipe, n: int, in_size: tuple[int, int], size: int, channels: int,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Params:
    """Draw the random parameters of ``recipe`` for ``n`` images.

    Args:
        recipe: the augmentation.
        n: number of images.
        in_size: ``(height, width)`` of the input images (the crop boxes are drawn in its pixels).
        size: output side.
        channels: image channels (the noise's shape).
        generator: source of randomness; None = the global torch generator of ``device``.
        device: where the parameters live; None = the generator's device, else CPU.

    Returns:
        The :class:`Params`.
    """
    dev = torch.device(device) if device is not None else (generator.device if generator is not None
                                                            else torch.device("cpu"))
    g = generator
    p = Params()
    crop = recipe.crop
    if isinstance(crop, PadCrop):
        high = 2 * crop.pad(size) + 1
        oy = torch.randint(0, high, (n, 1, 1), generator=g, device=dev)
        ox = torch.randint(0, high, (n, 1, 1), generator=g, device=dev)
        p.offset = torch.cat([oy, ox], 1).view(n, 2)
    elif isinstance(crop, ResizedCrop):
        p.box = resized_crop_boxes(n, in_size[0], in_size[1], crop, g, dev)
    if recipe.flip_p > 0:
        p.flip = torch.rand(n, 1, 1, generator=g, device=dev).view(n) < recipe.flip_p
    if (a := recipe.affine) is not None:
        p.angle = _uniform(n, -a.degrees, a.degrees, g, dev)
        p.shear = _uniform(n, -a.shear, a.shear, g, dev)
        p.scale = _uniform(n, *a.scale, g, dev)
        p.translate = _uniform(2 * n, -2 * a.translate, 2 * a.translate, g, dev).view(n, 2)
    if (j := recipe.jitter) is not None:
        on = torch.rand(n, 1, 1, 1, generator=g, device=dev).view(n) < j.p
        p.jitter_on = on
        p.brightness, p.contrast, p.saturation = (_factor(s, on, g, dev) for s in (j.brightness, j.contrast,
                                                                                     j.saturation))
        if j.hue > 0:
            p.hue = on.float() * _uniform(n, -j.hue, j.hue, g, dev)
    if recipe.grayscale_p > 0:
        p.grey = torch.rand(n, generator=g, device=dev) < recipe.grayscale_p
    if (b := recipe.blur) is not None:
        p.sigma = _uniform(n, *b.sigma, g, dev)
        p.blur_on = torch.rand(n, generator=g, device=dev) < b.p
    if recipe.noise_sigma > 0:
        p.noise = torch.randn((n, channels, size, size), generator=g, device=dev)
    if (e := recipe.erasing) is not None:
        p.erase_on = torch.rand(n, generator=g, device=dev) < e.p
        area = _uniform(n, *e.scale, g, dev) * (size * size)
        aspect = torch.exp(_uniform(n, *log_uniform_bounds(e.ratio), g, dev))
        eh = torch.sqrt(area * aspect).round().clamp(1, size)
        ew = torch.sqrt(area / aspect).round().clamp(1, size)
        top = (torch.rand(n, generator=g, device=dev) * (size - eh + 1)).floor()
        left = (torch.rand(n, generator=g, device=dev) * (size - ew + 1)).floor()
        p.erase_box = torch.stack([top, left, eh, ew], 1)
    return p


def _crop(x: torch.Tensor, p: Params, recipe: Recipe, size: int, one_image: bool) -> torch.Tensor:
    """Steps 1-2 (crop, flip) of ``x [B, C, H, W]`` (uint8 or float) -> float ``[B, C, size, size]``."""
    crop = recipe.crop
    mirror = p.flip
    if isinstance(crop, ResizedCrop) and one_image:
        top, left, h, w = (int(v) for v in p.box[0].tolist())
        x = K.to_float(TF.resized_crop(x, top, left, h, w, [size, size], antialias=True))
    elif isinstance(crop, ResizedCrop):
        theta = K.box_theta(p.box, x.shape[-2], x.shape[-1], mirror)
        return K.affine_resample(K.to_float(x), theta, size, padding="border")
    elif isinstance(crop, PadCrop):
        if x.shape[-2:] != (size, size):
            x = K.resize(K.to_float(x), size)
        oy, ox = p.offset.view(-1, 2, 1, 1).unbind(1)
        return K.to_float(K.crop_flip(x, crop.pad(size), oy, ox, None if mirror is None else mirror.view(-1, 1, 1)))
    else:
        x = K.resize(K.to_float(x), size)
    if mirror is not None:
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def apply_params(x: torch.Tensor, p: Params, recipe: Recipe, size: int, one_image: bool = False) -> torch.Tensor:
    """Augment ``x [B, C, H, W]`` (uint8, or float in ``[0, 1]``) with the parameters ``p`` of ``recipe``.

    Args:
        x: the images.
        p: their parameters, from :func:`sample_params`.
        recipe: the augmentation.
        size: output side.
        one_image: the per-item path: resized crops are cut from the full image and resized with antialiasing.

    Returns:
        Float ``[B, C, size, size]`` in ``[0, 1]``.
    """
    x = _crop(x, p, recipe, size, one_image)
    rgb = x.shape[1] == 3
    if p.angle is not None:
        x = K.affine_resample(x, K.affine_theta(p.angle, p.scale, p.shear, p.translate), size)
    if p.jitter_on is not None:
        sat = _per_image(p.saturation) if recipe.jitter.saturation > 0 and rgb else None
        x = K.jitter(x, _per_image(p.brightness), _per_image(p.contrast), sat)
        if p.hue is not None and rgb:
            x = torch.where(_per_image(p.jitter_on), K.adjust_hue(x, p.hue), x)
    if p.grey is not None and rgb:
        x = K.grayscale_where(x, p.grey)
    if p.blur_on is not None:
        x = K.gaussian_blur(x, p.sigma, p.blur_on, blur_kernel(size))
    if p.noise is not None:
        x = K.add_noise(x, p.noise, recipe.noise_sigma)
    if p.erase_on is not None:
        x = K.erase(x, p.erase_box, p.erase_on, recipe.erasing.value)
    return x


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def augment_batch(x: torch.Tensor, recipe: Recipe, size: int, generator: torch.Generator) -> torch.Tensor:
    """The batched path: ``x [B, C, H, W]`` (uint8, or float in ``[0, 1]``, on ``generator``'s device) augmented by
    ``recipe`` -> float ``[B, C, size, size]`` in ``[0, 1]``."""
    p = sample_params(recipe, x.shape[0], tuple(x.shape[-2:]), size, x.shape[1], generator, x.device)
    return apply_params(x, p, recipe, size)


def augment_item(image: torch.Tensor, recipe: Recipe, size: int) -> torch.Tensor:
    """The per-item path: one image ``[C, H, W]`` (uint8, or float in ``[0, 1]``) augmented by ``recipe`` with the
    global torch generator -> float ``[C, size, size]`` in ``[0, 1]``."""
    p = sample_params(recipe, 1, tuple(image.shape[-2:]), size, image.shape[0], None, image.device)
    return apply_params(image.unsqueeze(0), p, recipe, size, one_image=True)[0]
