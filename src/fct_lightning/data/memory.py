"""Fast in-memory data path (digits, CIFAR, small folders of images): whole-batch augmentation on the device.

:class:`InMemoryAugmentedLoader` holds a split as one tensor (uint8 for CIFAR and folders, float for digits), moved
to the GPU on first use when there is one, and produces ``(images, labels, indices)`` batches by indexing plus batched
tensor augmentation (:func:`fct_lightning.data.augment.augment_batch`), so no worker processes, collation or
host-to-device copies are involved. The augmentation is the family's :class:`~fct_lightning.data.recipes.Recipe`,
the one the per-item pipeline draws from too. Folder datasets are stored as squares of side
``round(image_size * 256 / 224)`` (see :func:`fct_lightning.data.decode.decode_all`): their training crops are
drawn from the stored square, not from the whole (maybe non-square) photo as the per-item pipeline does, and
their evaluation view is the centre crop, which equals the per-item ``Resize`` + ``CenterCrop`` pixel for pixel.
Images end as float32, normalised on the device.

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

from fct_lightning.data.augment import augment_batch
from fct_lightning.data.recipes import Recipe, recipe_for
from fct_lightning.data.sampling import dist_info, mix_seed, single_item_tail
from fct_lightning.data.transforms import center_offset


class _Items(Dataset):
    """Read-only view of the loader's items (unaugmented), so ``len(loader.dataset)`` works."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None) -> None:
        self.images, self.targets, self.positions = images, labels, positions

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        src = int(self.positions[i]) if self.positions is not None else i
        return self.images[src], int(self.targets[i]), i


class InMemoryAugmentedLoader:
    """Iterable of ``(images, labels, indices)`` batches from an in-memory split (see module docstring).

    Args:
        images: ``[N, C, H, W]`` uint8 (or float in ``[0, 1]``), the whole split.
        labels: ``[N]`` labels of the whole split.
        batch_size: items per batch (per rank); the last batch may be smaller.
        classes: keep only these class indices (None = all); ``index`` = position in the kept subset.
        family: ``"digits"``, ``"cifar"`` or ``"imagenet"``: the augmentation recipe's family
            (:func:`~fct_lightning.data.recipes.recipe_for`; ``views >= 2`` takes its strong recipe).
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
        recipe: the training augmentation; None = the family's (strong for ``views >= 2``).
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
        recipe: Recipe | None = None,
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
        self.recipe = recipe or recipe_for(family, views > 1)
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
        rank, world = dist_info()
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
            x = augment_batch(x, self.recipe, self.image_size, gen)
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
