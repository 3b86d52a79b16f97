"""Item order, seeds and shards: the rules both data paths follow.

The per-item loaders (:mod:`fct_lightning.data.base`) and the in-memory loader (:mod:`fct_lightning.data.memory`)
both import from here, and nothing here imports either of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import RandomSampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 chain; stable across processes and platforms)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def single_item_tail(per_rank: int, batch_size: int) -> bool:
    """Whether a rank's last training batch would hold a single item. The training loaders drop such a batch:
    BatchNorm cannot normalise one item in training mode (h's BatchNorm1d layers raise on it)."""
    return per_rank > 1 and per_rank % batch_size == 1


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShuffleSampler(RandomSampler):
    """A shuffling sampler whose order is a function of ``(seed, epoch)``, so a resumed run continues it.

    A plain ``RandomSampler`` with a seeded generator draws every epoch's order from one stream: a run resumed
    at epoch ``e`` re-creates the stream from the seed and replays epoch 0's order instead of epoch ``e``'s.
    Here Lightning's per-epoch :meth:`set_epoch` call (the one it makes for a ``DistributedSampler``) picks the
    epoch, and the order is drawn from its own generator seeded by ``mix_seed(seed, epoch)``. Iterated
    without :meth:`set_epoch` (a hand-written loop), each pass moves on to the next epoch's order.

    ``loader_generator`` (the ``DataLoader``'s ``generator``, which draws the worker processes' base seed each
    time an iterator is created) is re-seeded by :meth:`set_epoch` too, so a resumed epoch's workers get that
    epoch's seeds rather than epoch 0's (exactly so without ``persistent_workers``, whose workers are seeded
    once, at the first epoch they serve).

    It is a ``RandomSampler``, so under DDP Lightning still replaces it with its ``DistributedSampler``.

    Args:
        data_source: the dataset whose indices are shuffled.
        seed: base seed of every epoch's order.
        loader_generator: the ``DataLoader``'s generator, re-seeded per epoch (None = none).
    """

    def __init__(self, data_source: Any, seed: int, loader_generator: torch.Generator | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0
        self.loader_generator = loader_generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(mix_seed(self.seed, self.epoch, 1))

    def __iter__(self) -> Any:
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()
