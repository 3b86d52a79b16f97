"""The input an image model was trained on, and how a model reads batches prepared for another one.

Every image stage records the input its datamodule served while it trained (:class:`InputSpec`: the image side
and the per-channel mean and std of the normalisation) in its checkpoint. A pretrained torchvision or timm backbone
trains on its own input (224 px, ImageNet statistics for most; the datamodule follows the model's data config
unless ``--data.image_size`` / ``--data.mean`` / ``--data.std`` are set), while a chain's other models may read
32 px CIFAR-normalised batches. Where a frozen model then embeds another stage's batches (h's training, fct-eval,
fct-embed, the version matrices), :func:`convert` turns each batch into the model's own input on the device: undo
the served normalisation, resize (bilinear, antialiased) to the model's side, normalise with its statistics. Equal
inputs convert nothing, so chains of one input are computed exactly as before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class InputSpec:
    """Square images of side ``image_size``, normalised as ``(x - mean) / std`` per channel (``x`` in ``[0, 1]``)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_meta(self) -> dict[str, Any]:
        """The checkpoint's record (plain types: checkpoints are read weights-only)."""
        return {"image_size": int(self.image_size), "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std]}

    @classmethod
    def from_meta(cls, meta: Any) -> InputSpec | None:
        """The spec a checkpoint recorded; None for checkpoints written before it was recorded."""
        if not isinstance(meta, dict) or not meta.get("image_size") or not meta.get("mean") or not meta.get("std"):
            return None
        return cls(int(meta["image_size"]), tuple(float(v) for v in meta["mean"]),
                   tuple(float(v) for v in meta["std"]))

    @classmethod
    def of(cls, datamodule: Any) -> InputSpec | None:
        """What an image datamodule serves (its ``image_size``, ``mean``, ``std``; a spec is returned as it is);
        None for other datamodules."""
        if isinstance(datamodule, InputSpec):
            return datamodule
        size, mean, std = (getattr(datamodule, k, None) for k in ("image_size", "mean", "std"))
        if not size or not mean or not std:
            return None
        return cls(int(size), tuple(float(v) for v in mean), tuple(float(v) for v in std))


def check_convertible(served: InputSpec, own: InputSpec, what: str) -> None:
    """Channels cannot be converted: a model of 3-channel input cannot read 1-channel batches."""
    if len(served.mean) != len(own.mean):
        raise ValueError(f"{what} was trained on {len(own.mean)}-channel images but is given {len(served.mean)}-"
                         "channel ones; use a model trained on this dataset's channels.")


@functools.lru_cache(maxsize=64)
def _channel_stats(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[1, C, 1, 1]`` constant of per-channel statistics, made once per (values, dtype, device): converting
    every batch of an evaluation would otherwise copy the same few floats to the device each time. Only read.
    Made outside inference mode, so that a constant first made under fct-eval's ``inference_mode`` can still take
    part in a computation autograd records later."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def convert(x: Tensor, served: InputSpec, own: InputSpec) -> Tensor:
    """A batch ``[B, C, H, W]`` prepared as ``served``, as the model of input ``own`` expects it."""
    def stats(spec: InputSpec) -> tuple[Tensor, Tensor]:
        return (_channel_stats(spec.mean, x.dtype, x.device), _channel_stats(spec.std, x.dtype, x.device))

    mean, std = stats(served)
    x = x * std + mean
    if x.shape[-2:] != (own.image_size, own.image_size):
        x = F.interpolate(x, size=(own.image_size, own.image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    mean, std = stats(own)
    return (x - mean) / std
