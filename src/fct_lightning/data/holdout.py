"""A validation split held out of the training images, for model selection that never sees the test split.

``RetrievalDataModule(val_fraction=f)`` divides the training split once, per class, into the items every stage
trains on and the ``holdout`` split that the validation loop (and so checkpoint selection and early stopping)
scores; the test split is left for the final table (fct-eval). The division is a fixed function of the labels and
``f`` (its own seed, not the run's), so the old, side-info, new, BCT and transformation runs of a chain, whatever
their ``--seed``, all hold out the same items and none of them trains on one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.utils.data import Dataset

from fct_lightning.data.sampling import mix_seed

HOLDOUT = "holdout"  # the split name of the held-out validation items
HOLDOUT_SEED = 0x5EED  # the division's own seed: one division per (labels, fraction), whatever the run's seed


def check_val_fraction(value: Any) -> float:
    """``value`` as a float in ``[0, 1)``, or raise ValueError with the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"val_fraction={value!r} is invalid; give the share of each class's training images held "
                         "out for validation, a float in [0, 1) (e.g. 0.1; 0 = validate on the evaluation split)")
    return float(value)


def holdout_positions(targets: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted positions of the held-out items: ``fraction * n_c`` of each class ``c`` rounded half up (at least one of a
    class with two or more items), drawn by a permutation seeded with the class alone."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    held = []
    for c in torch.unique(targets).tolist():
        where = torch.nonzero(targets == c).flatten()
        n = len(where)
        k = min(n - 1, max(1, math.floor(fraction * n + 0.5))) if n > 1 else 0
        gen = torch.Generator().manual_seed(mix_seed(HOLDOUT_SEED, int(c)))
        held.append(where[torch.randperm(n, generator=gen)[:k]])
    return torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)


class SplitPart(Dataset):
    """Items ``positions`` of a source dataset, as a source (``part[i] -> (image, label)``, ``targets``, and
    ``paths`` when the source has them)."""

    def __init__(self, source: Dataset, positions: torch.Tensor) -> None:
        self.source = source
        self.positions = positions
        self.targets = torch.as_tensor(source.targets, dtype=torch.long)[positions]
        paths = getattr(source, "paths", None)
        if paths:
            self.paths = [paths[int(i)] for i in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.source[int(self.positions[i])]


def split_holdout(source: Dataset, fraction: float, in_memory: type | None = None) -> tuple[Dataset, Dataset]:
    """``(training part, held-out part)`` of ``source``. A source held in memory (an instance of ``in_memory``,
    with ``images`` and ``targets``) gives two in-memory sources of that type, which the in-memory loader takes."""
    targets = torch.as_tensor(source.targets, dtype=torch.long)
    held = holdout_positions(targets, fraction)
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[held] = False
    kept = torch.nonzero(keep).flatten()
    if in_memory is not None and isinstance(source, in_memory):
        return (in_memory(source.images[kept], targets[kept]), in_memory(source.images[held], targets[held]))
    return SplitPart(source, kept), SplitPart(source, held)
