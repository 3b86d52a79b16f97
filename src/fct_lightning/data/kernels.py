"""Batched image operations with per-image parameters: float ``[B, C, H, W]`` in ``[0, 1]`` unless said otherwise.

Pure functions: the random parameters come in (drawn by :func:`fct_lightning.data.augment.sample_params`), so the
per-item path (a batch of one) and the in-memory path (a whole batch on the device) run the same code. Where
torchvision has the operation, the result equals torchvision's per image (tests compare them); torchvision itself
applies one set of parameters to a whole batch, so it cannot serve the batched path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GREY_WEIGHTS = (0.299, 0.587, 0.114)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in ``[0, 1]`` (``x / 255``); float stays float32."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (float) resized to ``size x size``, bilinear and antialiased, unless it already is that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def crop_flip(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor,
              mirror: torch.Tensor | None = None) -> torch.Tensor:
    """``H x W`` windows of the zero-padded batch ``x [B, C, H, W]`` (any dtype) at offsets ``oy, ox [B, 1, 1]``
    in ``[0, 2 pad]``, mirrored horizontally where ``mirror [B, 1, 1]`` is True."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = (oy + torch.arange(h, device=dev).view(1, h, 1)).expand(b, h, w)
    cols = ox + torch.arange(w, device=dev).view(1, 1, w)
    if mirror is not None:
        cols = torch.where(mirror, ox + (w - 1) - torch.arange(w, device=dev).view(1, 1, w), cols)
    cols = cols.expand(b, h, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1).expand(b, h, w)
    return xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)


def box_theta(box: torch.Tensor, height: int, width: int, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Affine maps ``[B, 2, 3]`` (for :func:`affine_resample`) that resize the boxes ``box [B, 4]`` = (top, left,
    height, width) in pixels of a ``height x width`` image to the output, mirrored where ``mirror [B]`` is True.

    An output pixel centre ``u`` samples the box at ``left + (u + 0.5) * box_width / size - 0.5``, the sampling
    of torchvision's ``resized_crop``.
    """
    top, left, bh, bw = box.to(torch.float32).unbind(1)
    theta = torch.zeros(len(box), 2, 3, device=box.device)
    sign = torch.where(mirror, -1.0, 1.0) if mirror is not None else 1.0
    theta[:, 0, 0], theta[:, 0, 2] = bw / width * sign, (2 * left + bw) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh / height, (2 * top + bh) / height - 1
    return theta


def affine_theta(angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
                 translate: torch.Tensor) -> torch.Tensor:
    """Affine maps ``[B, 2, 3]`` of rotations and shears (degrees ``[B]``), zoom factors ``scale [B]`` and
    translations ``translate [B, 2]`` (fraction of the side), mapping output to input coordinates."""
    ang, sh = torch.deg2rad(angle), torch.deg2rad(shear)
    s = 1.0 / scale  # the grid maps output to input coordinates
    theta = torch.zeros(len(angle), 2, 3, device=angle.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) * s, -torch.sin(ang + sh) * s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) * s, torch.cos(ang + sh) * s
    theta[:, :, 2] = translate
    return theta


def affine_resample(x: torch.Tensor, theta: torch.Tensor, size: int, padding: str = "zeros") -> torch.Tensor:
    """Bilinear resampling of float ``x [B, C, H, W]`` through affine maps ``theta [B, 2, 3]`` to ``size x size``.

    ``padding``: ``"zeros"`` fills outside the image with 0; ``"border"`` repeats the edge pixels (crops: a sample
    between the last pixel centre and the image edge then keeps the edge's value instead of fading to 0).
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB ``x`` (ITU-R 601 weights); a 1-channel ``x`` is its own."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GREY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
           saturation: torch.Tensor | None = None) -> torch.Tensor:
    """Brightness, then contrast (about the mean grey level), then saturation (about each pixel's grey) of float
    ``x [B, C, H, W]``, by per-image factors ``[B, 1, 1, 1]``; clamped to ``[0, 1]`` once, at the end.

    The three are affine in ``x`` and in its grey image (the grey weights sum to 1), so they fold into
    ``a * x + b * grey(x) + c`` per image: two passes over the batch instead of about a dozen.
    """
    g = grey(x)
    bc = brightness * contrast
    shift = (1 - contrast) * brightness * g.mean(dim=(1, 2, 3), keepdim=True)
    if saturation is None or x.shape[1] == 1:
        return torch.addcmul(shift, x, bc).clamp_(0, 1)
    out = torch.addcmul(shift, x, saturation * bc)
    return out.addcmul_(g, (1 - saturation) * bc).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue of RGB ``x [B, 3, H, W]`` rotated by ``shift [B]`` (fraction of the circle, in ``[-0.5, 0.5]``) in HSV
    space, as torchvision's ``adjust_hue`` per image; saturation and value (the max and min channel) are kept."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)  # ties go to the first channel, as in torchvision
    delta = maxc - x.amin(1)
    # hue in sextants: (g - b) / delta where red is the max, 2 + (b - r) / delta for green, 4 + (r - g) / delta for blue
    diff = torch.stack([g - b, b - r, r - g], 1).gather(1, argmax.unsqueeze(1)).squeeze(1)
    h6 = diff / torch.where(delta > 0, delta, 1.0) + 2.0 * argmax + 6.0 * shift.view(-1, 1, 1)
    # HSV -> RGB: channel n of (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6,
    # with v = max and v s = max - min
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + h6.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def grayscale_where(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """RGB images of ``x`` turned grey (3 equal channels) where ``on [B]`` is True."""
    return torch.where(on.view(-1, 1, 1, 1), grey(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor, kernel: int) -> torch.Tensor:
    """Gaussian blur of the images of float ``x [B, C, H, W]`` where ``on [B]`` is True, each with its own
    ``sigma [B]``: a separable ``kernel``-tap filter (odd), reflect padding, as torchvision's ``GaussianBlur``."""
    b, dev = x.shape[0], x.device
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=dev).view(1, kernel)
    k1 = torch.exp(-0.5 * (t / sigma.view(b, 1)) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).to(x.dtype)  # [B, k]
    if x.device.type == "cpu":  # filter only the images drawn for blurring: half the work where work is the cost
        keep = on.view(b).nonzero().view(-1)
        if len(keep) == 0:
            return x
        return x.index_copy(0, keep, _separable(x.index_select(0, keep), k1.index_select(0, keep)))
    # on an accelerator the selection's host sync costs more than filtering every image
    return torch.where(on.view(b, 1, 1, 1), _separable(x, k1), x)


def _separable(x: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Each image of ``x [B, C, H, W]`` filtered by its own 1-D kernel ``k1 [B, k]`` along both axes, reflect
    padding."""
    b, c, h, w = x.shape
    kernel = k1.shape[1]
    k1 = k1.repeat_interleave(c, dim=0)  # [B * C, k]
    pad = kernel // 2
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k1.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k1.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


def erase(x: torch.Tensor, box: torch.Tensor, on: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """``x [B, C, H, W]`` with the rectangles ``box [B, 4]`` = (top, left, height, width) set to ``value`` where
    ``on [B]`` is True."""
    b, _, h, w = x.shape
    top, left, eh, ew = (v.view(b, 1, 1) for v in box.unbind(1))
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & on.view(b, 1, 1)
    return x.masked_fill(inside.unsqueeze(1), value)


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x + sigma * noise`` clipped to ``[0, 1]`` (torchvision's ``GaussianNoise``, given the standard normals)."""
    return (x + sigma * noise).clamp(0, 1)
