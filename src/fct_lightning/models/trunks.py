"""Backbone trunks from torchvision, timm or any ``nn.Module`` class, cut at their pooled feature.

A trunk maps ``[B, C, H, W]`` images to a pooled feature ``[B, F]``; :class:`~fct_lightning.models.backbones.
EmbeddingNet` puts the embedding head on it. Three families besides the project's own names:

* **torchvision**: every classification model of ``torchvision.models.list_models(module=torchvision.models)`` by its
  name (``mobilenet_v3_small``, ``efficientnet_b0``, ``convnext_tiny``, ...), built with ``weights=None``; its final
  classification layer (the last ``Linear``, or squeezenet's last 1x1 ``Conv2d``, under ``fc``, ``classifier``,
  ``head`` or ``heads``) becomes an ``Identity``, so the output is the feature that layer read.
* **timm**: ``timm:<name>`` (optional extra ``fct-lightning[timm]``), built with ``num_classes=0``: timm's own
  pooled, pre-logits features (``head_hidden_size`` or ``num_features`` wide).
* **class**: any ``nn.Module`` class, as a dotted path (``pkg.module.Net``), a ``{"class_path", "init_args"}``
  dict (LightningCLI's syntax) or an instance. Its forward must return ``[B, F]`` (``[B, F, 1, 1]`` is flattened);
  ``F`` is found by one forward pass of a dummy batch (``PROBE_SIZE`` px, or the side of the module's own
  ``input_size`` attribute when it has one).

Nothing here downloads anything: pretrained weights are :mod:`fct_lightning.models.weights`' business.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

TIMM_PREFIX = "timm:"
#: the attributes under which torchvision's classification models keep their classifier
_HEAD_ATTRS = ("fc", "classifier", "head", "heads")
#: constructor arguments some torchvision models need to return plain features (no auxiliary heads, no warning)
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                       "inception_v3": {"aux_logits": False, "init_weights": True}}
#: side of the dummy images used to measure a class-path module's feature size (when it has no data config)
PROBE_SIZE = 64


@dataclass
class Trunk:
    """A backbone cut at its pooled feature, and what loading weights into it needs to know.

    Attributes:
        module: The network, ``[B, C, H, W] -> [B, feature_dim]``.
        feature_dim: Width of the pooled feature.
        family: ``torchvision``, ``timm`` or ``class``.
        name: The model's name (torchvision / timm) or class path.
        head_prefixes: State-dict key prefixes of the classifier that was removed: keys under them in a weights
            file are the classifier's and are dropped when the file is loaded.
        data_config: Input size and normalisation the model was designed for (``input_size`` as ``(C, H, W)``,
            ``mean``, ``std``, ``interpolation``, ``crop_pct``), or None when it does not say.
    """

    module: nn.Module
    feature_dim: int
    family: str
    name: str
    head_prefixes: tuple[str, ...] = ()
    data_config: dict[str, Any] | None = field(default=None)


def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    return list(torchvision.models.list_models(module=torchvision.models))


def import_timm() -> Any:
    """The ``timm`` module, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ValueError("timm backbones (--model.backbone timm:NAME) need timm, which is not installed: "
                         "pip install 'fct-lightning[timm]' (or pip install timm).") from err
    return timm


def unknown_backbone(name: str, known: list[str], allowed: str) -> ValueError:
    """The error for a backbone ``name`` that is not in ``known``: the closest names (difflib) and what is allowed."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(f"backbone={name!r} is not known; {hint}{allowed}")


# ----------------------------------------------------------------- torchvision
def build_torchvision(name: str, in_channels: int = 3, cifar_stem: bool = False) -> Trunk:
    """A torchvision classification model by ``name``, randomly initialised, cut at its pooled feature.

    ``cifar_stem`` (ResNet-style models with ``conv1`` and ``maxpool`` only) swaps the 7x7/stride-2 stem and the
    max-pool for one 3x3/stride-1 convolution; ``in_channels != 3`` replaces the first convolution by one with
    that many input channels.
    """
    net = torchvision.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))
    if cifar_stem:
        if not (isinstance(getattr(net, "conv1", None), nn.Conv2d) and hasattr(net, "maxpool")):
            raise ValueError(f"cifar_stem=True applies to ResNet-style models (a conv1 and a maxpool); "
                             f"torchvision's {name} has none: set cifar_stem false.")
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        replace_first_conv(net, in_channels)
    prefix, feature_dim = strip_classifier(net, name)
    return Trunk(net, feature_dim, "torchvision", name, (prefix,), torchvision_data_config(name, in_channels))


def strip_classifier(net: nn.Module, name: str) -> tuple[str, int]:
    """Replace the final classification layer of a torchvision model by ``Identity``.

    Returns the removed layer's state-dict prefix (``"fc."``, ``"classifier.1."``, ...) and its input width,
    which is the pooled feature's.
    """
    for attr in _HEAD_ATTRS:
        head = getattr(net, attr, None)
        if not isinstance(head, nn.Module):
            continue
        layers = [(n, m) for n, m in head.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            continue
        path, layer = layers[-1]
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if path:
            parent_path, _, leaf = path.rpartition(".")
            parent = head.get_submodule(parent_path) if parent_path else head
            setattr(parent, leaf, nn.Identity())
        else:
            setattr(net, attr, nn.Identity())
        return f"{attr}.{path}." if path else f"{attr}.", width
    raise ValueError(f"cannot find the classifier of torchvision's {name} (looked under {_HEAD_ATTRS}); "
                     "pass it as a class path whose forward returns the pooled feature.")


def replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Give ``net``'s first 3-channel convolution ``in_channels`` input channels (a new, randomly initialised one)."""
    for path, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            parent_path, _, leaf = path.rpartition(".")
            setattr(net.get_submodule(parent_path) if parent_path else net, leaf, new)
            return
    raise ValueError(f"in_channels={in_channels}: the model has no 3-channel convolution to replace; "
                     "use 3-channel images or another backbone.")


def torchvision_data_config(name: str, in_channels: int = 3, weights: str = "DEFAULT") -> dict[str, Any] | None:
    """Input size and normalisation of torchvision's ``name`` from its weights' transforms (no download)."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    if weights not in enum.__members__:
        return None
    transform = enum[weights].transforms()
    if not hasattr(transform, "crop_size"):
        return None
    crop = int(transform.crop_size[0])
    config = {"input_size": (in_channels, crop, crop), "interpolation": transform.interpolation.value,
              "crop_pct": crop / int(transform.resize_size[0]), "mean": tuple(transform.mean),
              "std": tuple(transform.std)}
    return _channels(config, in_channels)


def _channels(config: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """An RGB normalisation means nothing for other channel counts: drop it there."""
    if in_channels != 3:
        config.update(mean=None, std=None)
    return config


# ----------------------------------------------------------------- timm
def build_timm(name: str, in_channels: int = 3) -> Trunk:
    """``timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)``: timm's pooled feature."""
    timm = import_timm()
    if not timm.is_model(name.split(".")[0]):
        raise unknown_backbone(TIMM_PREFIX + name, [TIMM_PREFIX + n for n in timm.list_models()],
                               "see timm.list_models() for the timm names (timm:NAME).")
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    cfg = timm.data.resolve_data_config({}, model=net)
    data_config = {"input_size": tuple(cfg["input_size"]), "interpolation": cfg.get("interpolation"),
                   "crop_pct": cfg.get("crop_pct"), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    classifier = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # the pooled feature a num_classes=0 model returns: the pre-logits width (head_hidden_size, wider than
    # num_features where a head layer sits before the classifier, e.g. MobileNetV3's conv_head)
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return Trunk(net, int(width), "timm", name, tuple(f"{h}." for h in heads),
                 _channels(data_config, in_channels))


# ----------------------------------------------------------------- any class
def build_class(spec: str | dict[str, Any] | nn.Module, in_channels: int = 3) -> Trunk:
    """Any ``nn.Module``: a dotted class path, a ``{"class_path", "init_args"}`` dict or an instance."""
    if isinstance(spec, nn.Module):
        module, path = spec, f"{type(spec).__module__}.{type(spec).__qualname__}"
    else:
        path, init_args = (spec, {}) if isinstance(spec, str) else (spec.get("class_path"), spec.get("init_args"))
        if not isinstance(path, str) or (isinstance(spec, dict) and set(spec) - {"class_path", "init_args"}):
            raise ValueError(f"backbone={spec!r}: a backbone given as a dict needs 'class_path' (and optionally "
                             "'init_args') and nothing else.")
        cls = import_class(path)
        try:
            module = cls(**(init_args or {}))
        except TypeError as err:
            raise ValueError(f"backbone={path!r} cannot be built with init_args={init_args or {}}: {err}") from err
    size = getattr(module, "input_size", None)
    side = int(size[-1]) if isinstance(size, (tuple, list)) and size else PROBE_SIZE
    feature_dim = probe_feature_dim(module, in_channels, side, path)
    return Trunk(module, feature_dim, "class", path)


def import_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass at the dotted ``path``; a clear error when there is none."""
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"backbone={path!r} cannot be imported ({type(err).__name__}: {err}); give a class path "
                         "such as mypackage.module.MyNet, importable from where fct-fit runs.") from err
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"backbone={path!r} is not an nn.Module class; give a torchvision name, timm:NAME or the "
                         "class path of an nn.Module.")
    return cls


@torch.no_grad()
def probe_feature_dim(module: nn.Module, in_channels: int, side: int, name: str) -> int:
    """Width of ``module``'s feature, from one forward pass of two ``side`` px dummy images in eval mode."""
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(2, in_channels, side, side))
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor) or not (out.dim() == 2 or (out.dim() == 4 and out.shape[2:] == (1, 1))):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"backbone={name!r} must return a pooled feature [B, F] (or [B, F, 1, 1]) but returned "
                         f"{shape} for [2, {in_channels}, {side}, {side}] images; end its forward with pooling and "
                         "a flatten.")
    return int(out.shape[1])


__all__ = ["TIMM_PREFIX", "Trunk", "build_class", "build_timm", "build_torchvision", "import_timm",
           "probe_feature_dim", "torchvision_names", "unknown_backbone"]
