"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``--device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``, with a clear error."""
    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for a GPU, but CUDA is not available here; "
                         "use --device cpu (or auto)")
    return dev
