"""Fast in-memory data path (digits, CIFAR, small folders of images): whole-batch augmentation on the device.

:class:`InMemoryAugmentedLoader` holds a split as one tensor (uint8 for CIFAR and folders, float for digits), moved to the
GPU on first use when there is one, and produces ``(images, labels, indices)`` batches by indexing plus batched
tensor augmentation, so no worker processes, collation or host-to-device copies are involved:

* ``cifar``, ``views == 1``: random crop with ``size / 8`` px zero padding (integer offsets) + horizontal flip;
* ``cifar``, ``views >= 2``: SimCLR-style random resized crop (scale 0.2-1, aspect 3/4-4/3) and flip in one
  ``grid_sample`` (border padding: samples past the last pixel centre repeat the edge), colour jitter (brightness/contrast/saturation 0.4, p=0.8; no hue) and grayscale (p=0.2);
* ``digits``: shift by up to 1 px, rotation/scale (stronger with shear and contrast for ``views >= 2``), noise,
  and for ``views >= 2`` random erasing (p=0.3), as the per-item pipeline;
* ``imagenet`` (folder datasets, stored as squares of side ``round(image_size * 256 / 224)``, see
  :func:`fct_lightning.data.folder.decode_all`): ``RandomResizedCrop(image_size)`` (scale 0.08-1, aspect
  3/4-4/3) and flip in one ``grid_sample``; for ``views >= 2`` also colour jitter (0.4/0.4/0.2, p=0.8; no hue),
  grayscale (p=0.2) and Gaussian blur (p=0.5, sigma 0.1-2). The crop is drawn from the stored square, not from
  the whole (maybe non-square) photo as the per-item pipeline does. Evaluation is the centre crop, which equals
  the per-item ``Resize`` + ``CenterCrop`` pixel for pixel;
* then conversion to float32 and normalisation, on the device.

Sharding follows :class:`torch.utils.data.DistributedSampler`: when ``torch.distributed`` is initialised, every
epoch's (seeded) permutation is padded by wrapping to a multiple of the world size and rank ``r`` takes
``perm[r::world_size]``; ``index`` identifies the padding duplicates. Lightning calls :meth:`set_epoch` every
epoch (the loader is its own ``sampler``); without it, each iteration advances the epoch by one. Given ``seed``,
batches are a deterministic function of ``(seed, epoch, rank, world size, batch size)`` on a given device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fct_lightning.data.base import mix_seed, single_item_tail
from fct_lightning.data.transforms import blur_kernel


class _Items(Dataset):
    """Read-only view of the loader's items (unaugmented), so ``len(loader.dataset)`` works."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None) -> None:
        self.images, self.targets, self.positions = images, labels, positions

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        src = int(self.positions[i]) if self.positions is not None else i
        return self.images[src], int(self.targets[i]), i


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random ``H x W`` crops of the zero-padded batch ``x [B, C, H, W]`` (+ random horizontal flips)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen, device=dev)
    rows = (oy + torch.arange(h, device=dev).view(1, h, 1)).expand(b, h, w)
    cols = ox + torch.arange(w, device=dev).view(1, 1, w)
    if flip:
        mirror = torch.rand(b, 1, 1, generator=gen, device=dev) < 0.5
        cols = torch.where(mirror, ox + (w - 1) - torch.arange(w, device=dev).view(1, 1, w), cols)
    cols = cols.expand(b, h, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1).expand(b, h, w)
    return xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)


def affine_resample(x: torch.Tensor, theta: torch.Tensor, size: int, padding: str = "zeros") -> torch.Tensor:
    """Bilinear resampling of float ``x [B, C, H, W]`` through affine maps ``theta [B, 2, 3]``.

    ``padding``: ``"zeros"`` fills outside the image with 0; ``"border"`` repeats the edge pixels (crops: a sample
    between the last pixel centre and the image edge then keeps the edge's value instead of fading to 0).
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def resized_crop_theta(b: int, gen: torch.Generator, device: torch.device, scale=(0.2, 1.0),
                       ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Affine maps of random resized crops (area fraction ``scale``, aspect ``ratio``) with random flips."""
    area = _uniform(b, *scale, gen, device)
    logr = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen, device)
    sw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    sh = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen, device=device) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=gen, device=device) * 2 - 1) * (1 - sh)
    sign = torch.where(torch.rand(b, generator=gen, device=device) < 0.5, -1.0, 1.0) if flip else 1.0
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    return theta


def similarity_theta(b: int, gen: torch.Generator, device: torch.device, degrees: float, scale=(1.0, 1.0),
                     translate: float = 0.0, shear: float = 0.0) -> torch.Tensor:
    """Affine maps of random rotations, scalings, shears (degrees) and translations (fraction of the side)."""
    ang = torch.deg2rad(_uniform(b, -degrees, degrees, gen, device))
    sh = torch.deg2rad(_uniform(b, -shear, shear, gen, device))
    s = 1.0 / _uniform(b, *scale, gen, device)  # the grid maps output to input coordinates
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) * s, -torch.sin(ang + sh) * s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) * s, torch.cos(ang + sh) * s
    theta[:, :, 2] = _uniform(2 * b, -2 * translate, 2 * translate, gen, device).view(b, 2)
    return theta


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
           saturation: torch.Tensor | None = None) -> torch.Tensor:
    """Brightness, then contrast (about the mean grey level), then saturation (about each pixel's grey) of float
    ``x [B, C, H, W]``, by per-image factors ``[B, 1, 1, 1]``; clamped to ``[0, 1]`` once, at the end.

    The three are affine in ``x`` and in its grey image (the grey weights sum to 1), so they fold into
    ``a * x + b * grey(x) + c`` per image: two passes over the batch instead of about a dozen.
    """
    grey = _gray(x)
    bc = brightness * contrast
    shift = (1 - contrast) * brightness * grey.mean(dim=(1, 2, 3), keepdim=True)
    if saturation is None or x.shape[1] == 1:
        return torch.addcmul(shift, x, bc).clamp_(0, 1)
    out = torch.addcmul(shift, x, saturation * bc)
    return out.addcmul_(grey, (1 - saturation) * bc).clamp_(0, 1)


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = 0.4, p: float = 0.8,
                 saturation: bool | float = True) -> torch.Tensor:
    """Batched brightness/contrast(/saturation) jitter of float ``x`` in ``[0, 1]``, applied with prob. ``p``.

    ``saturation``: True = jitter it by ``strength`` too, a float = by that strength, False/0 = not at all.
    """
    b, dev = x.shape[0], x.device
    on = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < p).to(x.dtype)
    factor = lambda s: 1 + on * _uniform(b, -s, s, gen, dev).view(b, 1, 1, 1)
    brightness, contrast = factor(strength), factor(strength)
    sat = strength if saturation is True else float(saturation)
    return jitter(x, brightness, contrast, factor(sat) if sat and x.shape[1] == 3 else None)


def gaussian_blur(x: torch.Tensor, gen: torch.Generator, kernel: int, sigma=(0.1, 2.0),
                  p: float = 0.5) -> torch.Tensor:
    """Batched Gaussian blur of float ``x [B, C, H, W]`` with a random ``sigma`` per image, applied with prob. ``p``.

    Separable ``kernel``-tap filter (odd), reflect padding, as torchvision's ``GaussianBlur``.
    """
    b, dev = x.shape[0], x.device
    s = _uniform(b, *sigma, gen, dev).view(b, 1)
    on = torch.rand(b, 1, 1, 1, generator=gen, device=dev) < p
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=dev).view(1, kernel)
    k1 = torch.exp(-0.5 * (t / s) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).to(x.dtype)  # [B, k]
    if x.device.type == "cpu":  # filter only the images drawn for blurring: half the work where work is the cost
        keep = on.view(b).nonzero().view(-1)
        if len(keep) == 0:
            return x
        return x.index_copy(0, keep, _separable(x.index_select(0, keep), k1.index_select(0, keep)))
    # on an accelerator the selection's host sync costs more than filtering every image
    return torch.where(on, _separable(x, k1), x)


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


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float = 0.3, scale=(0.02, 0.12),
                   ratio=(0.3, 3.3), value: float = 0.0) -> torch.Tensor:
    """Batched ``RandomErasing``: with prob. ``p`` per image, a rectangle of ``scale`` of the area and aspect ratio
    in ``ratio`` (log-uniform) is set to ``value``. Sides are clamped to the image (torchvision draws again
    instead, up to 10 times, then leaves the image as it is)."""
    b, _, h, w = x.shape
    dev = x.device
    on = torch.rand(b, generator=gen, device=dev) < p
    area = _uniform(b, *scale, gen, dev) * (h * w)
    aspect = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen, dev))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (torch.rand(b, generator=gen, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, generator=gen, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)) & on.view(b, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), value)


def center_offset(stored: int, size: int) -> int:
    """Top/left offset of a ``size`` centre crop of a ``stored`` side, rounded as torchvision's ``CenterCrop``."""
    return round((stored - size) / 2.0)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    on = torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=x.device) < p
    return torch.where(on, _gray(x).expand_as(x), x)


def augment_batch(x: torch.Tensor, family: str, strong: bool, size: int, gen: torch.Generator) -> torch.Tensor:
    """Batched training augmentation of ``x [B, C, H, W]`` (uint8 or float in [0, 1]) -> float in [0, 1]."""
    dev, b = x.device, x.shape[0]
    if family == "cifar" and not strong:
        if x.shape[-1] != size:
            x = F.interpolate(_to_float(x), size=(size, size), mode="bilinear", antialias=True)
        return _to_float(crop_flip(x, max(1, round(size / 8)), gen))
    x = _to_float(x)
    if family == "cifar":
        x = affine_resample(x, resized_crop_theta(b, gen, dev), size, padding="border")
        return random_grayscale(color_jitter(x, gen), gen)
    if family == "imagenet":  # RandomResizedCrop(size) + flip (+ jitter, grayscale, blur) on the stored square
        x = affine_resample(x, resized_crop_theta(b, gen, dev, scale=(0.08, 1.0)), size, padding="border")
        if not strong:
            return x
        x = random_grayscale(color_jitter(x, gen, 0.4, 0.8, saturation=0.2), gen)
        return gaussian_blur(x, gen, blur_kernel(size))
    if family != "digits":
        raise ValueError(f"family={family!r} has no batched augmentation; allowed: cifar, digits, imagenet")
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = crop_flip(x, max(1, round(size / 8)), gen, flip=False)
    if strong:
        x = affine_resample(x, similarity_theta(b, gen, dev, 20, (0.8, 1.2), 0.1, 10), size)
        x = color_jitter(x, gen, 0.4, 0.8, saturation=False)
    else:
        x = affine_resample(x, similarity_theta(b, gen, dev, 10, (0.9, 1.1)), size)
    sigma = 0.1 if strong else 0.05
    x = (x + sigma * torch.randn(x.shape, generator=gen, device=dev)).clamp(0, 1)
    return random_erasing(x, gen) if strong else x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


class InMemoryAugmentedLoader:
    """Iterable of ``(images, labels, indices)`` batches from an in-memory split (see module docstring).

    Args:
        images: ``[N, C, H, W]`` uint8 (or float in ``[0, 1]``), the whole split.
        labels: ``[N]`` labels of the whole split.
        batch_size: items per batch (per rank); the last batch may be smaller.
        classes: keep only these class indices (None = all); ``index`` = position in the kept subset.
        family: ``"cifar"`` or ``"digits"`` (augmentation family).
        train: apply training augmentation; False = normalisation only (resize if ``image_size`` differs).
        views: 1, or V >= 2 augmented views (batches ``[B, V, C, H, W]``).
        image_size: output side; None = the stored size.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        shuffle: new seeded permutation every epoch (else dataset order).
        seed: base seed of permutations and augmentation; None = drawn from the global torch RNG per epoch.
        device: where images live and batches are built; None = the current CUDA device if any, else CPU.
        rank: shard index; None = from ``torch.distributed`` (0 when not initialised).
        world_size: number of shards; None = from ``torch.distributed`` (1 when not initialised).
        drop_single_tail: leave out a rank's last batch when it would hold one item (training loaders: BatchNorm
            cannot train on one item).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        classes: Sequence[int] | None = None,
        family: str = "cifar",
        train: bool = True,
        views: int = 1,
        image_size: int | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        shuffle: bool = True,
        seed: int | None = 0,
        device: str | torch.device | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        drop_single_tail: bool = False,
    ) -> None:
        if len(labels) == 0:
            raise ValueError("the in-memory loader got an empty split")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if views < 1:
            raise ValueError(f"views={views} must be >= 1")
        labels = torch.as_tensor(labels, dtype=torch.long)
        positions = None
        if classes is not None:
            positions = torch.nonzero(torch.isin(labels, torch.as_tensor(list(classes)))).flatten()
            labels = labels[positions]
        self.images, self.labels, self.positions = images, labels, positions
        self.dataset = _Items(images, labels, positions)
        self.batch_size, self.family, self.train, self.views = batch_size, family, train, views
        self.image_size = image_size or images.shape[-1]
        self.mean, self.std = tuple(mean), tuple(std)
        self.shuffle, self.seed = shuffle, seed
        self._device = torch.device(device) if device is not None else None
        self._rank, self._world = rank, world_size
        self.drop_single_tail = drop_single_tail
        self.epoch = 0
        self._drawn: tuple[int, int] | None = None
        self._on_device: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    #: no batch sampler (Lightning inspects ``batch_sampler`` next to ``sampler``)
    batch_sampler = None

    @property
    def sampler(self) -> InMemoryAugmentedLoader:
        """Itself, so that Lightning's per-epoch ``sampler.set_epoch`` call reaches :meth:`set_epoch`."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            cuda = torch.cuda.is_available()
            self._device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return self._device

    def _shard(self) -> tuple[int, int]:
        rank, world = _dist_info()
        return (self._rank if self._rank is not None else rank), (self._world or world)

    def _per_rank(self) -> int:
        """Items this rank serves per epoch (padded like DistributedSampler, less a dropped one-item tail)."""
        _, world = self._shard()
        n = math.ceil(len(self.labels) / world)
        return n - 1 if self.drop_single_tail and single_item_tail(n, self.batch_size) else n

    def __len__(self) -> int:
        return math.ceil(self._per_rank() / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's item indices (CPU, int64) for ``epoch``, padded like DistributedSampler."""
        rank, world = self._shard()
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self._base_seed(epoch), 1))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = math.ceil(n / world) * world
        if total > n:  # pad by wrapping around, as DistributedSampler does
            order = order.repeat(math.ceil(total / n))[:total]
        return order[rank:total:world]

    def _base_seed(self, epoch: int) -> int:
        if self.seed is None:
            if self._drawn is None or self._drawn[0] != epoch:
                self._drawn = (epoch, int(torch.randint(0, 2**62, ()).item()))
            return self._drawn[1]
        return mix_seed(self.seed, epoch)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._on_device is None:
            dev = self.device
            pos = self.positions.to(dev) if self.positions is not None else None
            self._on_device = (self.images.to(dev), self.labels.to(dev), pos)
        return self._on_device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        rank, world = self._shard()
        images, labels, positions = self._tensors()
        dev = images.device
        order = self.indices(epoch)[:self._per_rank()].to(dev)
        gen = torch.Generator(device=dev).manual_seed(mix_seed(self._base_seed(epoch), 2, rank, world))
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = images[positions[idx] if positions is not None else idx]
            if self.views > 1:
                x = torch.stack([self._transform(x, gen, mean, std) for _ in range(self.views)], dim=1)
            else:
                x = self._transform(x, gen, mean, std)
            yield x, labels[idx], idx

    def _transform(self, x: torch.Tensor, gen: torch.Generator, mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
        if self.train:
            x = augment_batch(x, self.family, self.views > 1, self.image_size, gen)
        else:
            # uint8 scaled as torchvision's ToDtype does (x * (1/255)), so evaluation views equal the per-item ones
            x = x.float().mul_(1.0 / 255) if x.dtype == torch.uint8 else x.float()
            side = self.image_size
            if self.family == "imagenet" and x.shape[-1] > side:  # stored squares: the evaluation centre crop
                o = center_offset(x.shape[-1], side)
                x = x[..., o:o + side, o:o + side]
            elif x.shape[-1] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        return (x - mean) / std
