"""Pretrained backbone weights: from a local file, or from torchvision's / timm's own loaders.

A local file (``--model.weights PATH``) is a state dict saved with ``torch.save`` (read with ``weights_only=True``:
nothing a user hands in may run code) or a ``.safetensors`` file. A file may also hold the state dict under
``state_dict`` or ``model`` (a Lightning or a training-script checkpoint); a ``module.`` prefix (DDP) and the
``net.trunk.`` / ``trunk.`` prefix of this project's own checkpoints are removed, and the keys of the
classifier that the trunk no longer has are dropped. Anything else that does not fit is an error naming the
missing and unexpected keys.

Hub weights (``--model.pretrained true``, or a torchvision weights name such as ``--model.weights IMAGENET1K_V1``)
come from the framework's loader, which downloads them once into its cache. Offline, the download fails, and so
does this, in one line that says how to bring the file over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from fct_lightning.models.trunks import import_timm

#: key prefixes removed from a weights file before it is matched against the backbone, tried in this order
STRIP_PREFIXES = ("module.", "net.trunk.", "trunk.")
#: suffixes that make ``--model.weights`` a file path rather than a torchvision weights name
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
_SHOW = 5


def is_weights_file(weights: str) -> bool:
    """Whether ``weights`` names a file (a path separator, a known suffix, or an existing file) rather than a
    torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...)."""
    return "/" in weights or "\\" in weights or weights.lower().endswith(FILE_SUFFIXES) or Path(weights).is_file()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (``.safetensors``, or anything ``torch.load(weights_only=True)`` reads)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--model.weights {path}: no such file; pass a state dict (.pt/.pth) or a .safetensors "
                         "file of the backbone.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as err:
        raise ValueError(f"--model.weights {path}: reading .safetensors files needs the safetensors package "
                         "(pip install safetensors).") from err
    except Exception as err:  # any unpickling, zip or header failure means the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"--model.weights {path} cannot be read as a weights-only state dict or safetensors file "
                         f"({type(err).__name__}: {first}); save the weights with torch.save(model.state_dict(), "
                         "PATH) or safetensors.torch.save_file.") from err
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--model.weights {path} holds no state dict (a mapping of names to tensors); save the "
                         "weights with torch.save(model.state_dict(), PATH).")
    return dict(state)


def fit_state_dict(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str,
                   drop_prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """``state`` with its keys matched to ``module``'s, or a ``ValueError`` naming the keys that do not fit.

    Prefixes of :data:`STRIP_PREFIXES` are removed when every key has one; keys under ``drop_prefixes`` (the
    removed classifier) are dropped; a first convolution saved for 3 channels is summed over them for a 1-channel
    model (timm's adaptation).
    """
    state = dict(state)
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(p and k.startswith(p) for p in drop_prefixes)}
    own = module.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if (mine is not None and value.dim() == 4 and mine.dim() == 4 and mine.shape[1] == 1 and value.shape[1] == 3
                and mine.shape[0] == value.shape[0] and mine.shape[2:] == value.shape[2:]):
            state[key] = value.sum(1, keepdim=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:_SHOW])}{', ...' if len(keys) > _SHOW else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", shapes)) if keys]
        raise ValueError(f"the weights {source} do not fit the backbone {what}: {'; '.join(parts)}. Pass weights "
                         f"saved from this architecture (torch.save(backbone.state_dict(), PATH)), or choose the "
                         "backbone they were saved from.")
    return state


def load_weights(module: nn.Module, state: Mapping[str, Tensor], source: str, what: str,
                 drop_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` (strictly, after :func:`fit_state_dict`)."""
    module.load_state_dict(fit_state_dict(module, state, source, what, drop_prefixes), strict=True)


def hub_state_dict(family: str, name: str, weights: str, in_channels: int) -> dict[str, Tensor]:
    """Pretrained weights from the framework's own loader (downloaded into its cache the first time).

    Args:
        family: ``torchvision`` or ``timm``.
        name: The model name (a timm name may carry its pretrained tag, ``convnext_tiny.fb_in1k``).
        weights: torchvision's weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...); ignored by timm.
        in_channels: Image channels (timm adapts its first convolution itself).
    """
    if family == "torchvision":
        enum = torchvision.models.get_model_weights(name)
        if weights not in enum.__members__:
            raise ValueError(f"--model.weights {weights}: torchvision's {name} has no such weights; choose one of "
                             f"{list(enum.__members__)}, or pass a file path.")
        chosen = enum[weights]
        return _download(lambda: chosen.get_state_dict(progress=False, check_hash=True), f"{name} {chosen}")
    if family == "timm":
        timm = import_timm()
        net = _download(lambda: timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_channels),
                        f"timm:{name}")
        return net.state_dict()
    raise ValueError(f"a {family} backbone has no pretrained weights of its framework; pass --model.weights PATH.")


def _download(get: Callable[[], Any], what: str) -> Any:
    try:
        return get()
    except Exception as err:  # URLError, HTTPError, OSError, huggingface_hub's errors: all mean "not fetched"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"the pretrained weights of {what} could not be downloaded (offline?) "
                         f"({type(err).__name__}: {first[:200]}): download them on a machine with internet and "
                         "pass --model.weights PATH.") from err


__all__ = ["fit_state_dict", "hub_state_dict", "is_weights_file", "load_weights", "read_state_dict"]
