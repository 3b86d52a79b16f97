"""Backbones that map images to embeddings, and the bias-free classifier on top.

``backbone`` names a trunk (the network up to its pooled feature) in one of four ways:

* this project's own names, :data:`BACKBONES`: ``resnet18``, ``resnet34``, ``resnet50`` (torchvision's
  definitions) and ``convnet`` (:class:`SmallConvNet`, for tiny grey images). For 32 px images,
  ``cifar_stem=True`` replaces the ResNets' 7x7/stride-2 convolution and max-pool by one 3x3/stride-1
  convolution, the usual CIFAR adaptation;
* any other torchvision classification model by name (``mobilenet_v3_small``, ``efficientnet_b0``, ...);
* ``timm:<name>``, any timm model (the optional extra ``fct-lightning[timm]``);
* any ``nn.Module``: a class path, a ``{"class_path", "init_args"}`` dict (LightningCLI's syntax) or an instance.

See :mod:`fct_lightning.models.trunks` for how each is cut at its pooled feature. Every trunk starts randomly
initialised; pretrained weights come from a file or the framework's loader (:mod:`fct_lightning.models.weights`,
:meth:`EmbeddingNet.load_backbone_weights`). The embedding head (a linear layer, or a 2-layer MLP) maps the pooled
feature to ``embedding_dim``, optionally followed by a ReLU (as the FCT reference does) and/or L2 normalisation.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from fct_lightning.models.inputs import InputSpec, check_convertible, convert
from fct_lightning.models.trunks import (
    TIMM_PREFIX,
    Trunk,
    build_class,
    build_timm,
    build_torchvision,
    torchvision_data_config,
    torchvision_names,
    unknown_backbone,
)
from fct_lightning.models.weights import hub_state_dict, is_weights_file, load_weights, read_state_dict

BACKBONES = ("resnet18", "resnet34", "resnet50", "convnet")
"""The project's own backbone names (kept bit-for-bit: same layers, same order of random initialisation)."""
HEADS = ("linear", "mlp")


class SmallConvNet(nn.Module):
    """A small ConvNet for tiny grey images such as scikit-learn's 8x8 digits.

    Args:
        in_channels: Number of input channels.
        width: Channels of the first block; the second block doubles it.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = 2 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def _resnet_trunk(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    out_features = net.fc.in_features
    net.fc = nn.Identity()
    return net, out_features


BackboneSpec = str | dict[str, Any] | nn.Module
"""What ``backbone`` accepts: a name, ``timm:<name>``, a class path, a ``{"class_path", "init_args"}`` dict or an
``nn.Module`` instance."""

ALLOWED = (f"choose one of {BACKBONES}, a torchvision classification model (torchvision.models.list_models()), "
           "timm:NAME (a timm model), or the class path of an nn.Module (mypackage.module.MyNet).")


def build_trunk(backbone: BackboneSpec, in_channels: int = 3, cifar_stem: bool = False, width: int = 32) -> Trunk:
    """The trunk ``backbone`` names (see the module docstring), randomly initialised."""
    if isinstance(backbone, str) and backbone in BACKBONES:
        if backbone == "convnet":  # cifar_stem means nothing to it and is ignored, as always
            net: nn.Module = SmallConvNet(in_channels, width)
            return Trunk(net, net.out_features, "local", backbone)
        net, feat = _resnet_trunk(backbone, in_channels, cifar_stem)
        return Trunk(net, feat, "local", backbone, ("fc.",))
    if isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX):
        if cifar_stem:
            raise ValueError(f"cifar_stem=True applies to ResNet-style torchvision models, not to {backbone}; set "
                             "cifar_stem false (or pick a timm model made for small images).")
        return build_timm(backbone[len(TIMM_PREFIX):], in_channels)
    if isinstance(backbone, str) and "." not in backbone:
        names = torchvision_names()
        if backbone in names:
            return build_torchvision(backbone, in_channels, cifar_stem)
        raise unknown_backbone(backbone, [*BACKBONES, *names], ALLOWED)
    if not isinstance(backbone, (str, dict, nn.Module)):
        raise ValueError(f"backbone={backbone!r} ({type(backbone).__name__}): {ALLOWED}")
    if cifar_stem:
        raise ValueError("cifar_stem=True applies to ResNet-style torchvision models, not to a class-path backbone; "
                         "set cifar_stem false and build the stem into the module.")
    return build_class(backbone, in_channels)


class EmbeddingNet(nn.Module):
    """Backbone trunk + embedding head.

    Args:
        backbone: The trunk: one of :data:`BACKBONES`, a torchvision classification model's name, ``timm:<name>``,
            a class path, a ``{"class_path", "init_args"}`` dict or an ``nn.Module`` (see the module docstring).
        embedding_dim: Size of the embedding.
        in_channels: Image channels (1 for digits, 3 for colour images).
        cifar_stem: Use the 3x3/stride-1 stem without max-pool (for 32 px images). ResNet-style models only.
        embed_relu: Apply a ReLU to the embedding (the FCT reference does).
        normalize: L2-normalise the embedding.
        width: Width of the small ConvNet (ignored by the others).
        head: ``linear`` (one linear layer, feature -> embedding) or ``mlp`` (linear feature -> feature,
            BatchNorm, ReLU, linear feature -> embedding).
        weights: Pretrained weights of the trunk: a file (a state dict saved with ``torch.save``, read
            weights-only, or a ``.safetensors`` file) or a torchvision weights name (``DEFAULT``,
            ``IMAGENET1K_V1``, ...; torchvision backbones and the own ResNets). None: random initialisation.
        pretrained: Take the framework's default pretrained weights (torchvision's ``DEFAULT``, timm's
            ``pretrained=True``), downloaded into its cache the first time (not possible offline: pass
            ``weights`` instead).
        load_weights: Load ``weights`` / ``pretrained`` now. Stages pass False and call
            :meth:`load_backbone_weights` when training starts, so that rebuilding a trained model from its
            checkpoint reads no weights file and downloads nothing.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        embedding_dim: int = 128,
        in_channels: int = 3,
        cifar_stem: bool = False,
        embed_relu: bool = False,
        normalize: bool = False,
        width: int = 32,
        head: str = "linear",
        weights: str | None = None,
        pretrained: bool = False,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim={embedding_dim} must be a positive integer.")
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not known; choose one of {HEADS}.")
        trunk = build_trunk(backbone, in_channels, cifar_stem, width)
        self.weights_source = _weights_source(trunk, weights, pretrained)
        self.trunk: nn.Module = trunk.module
        feat = trunk.feature_dim
        if head == "linear":
            self.embed: nn.Module = nn.Linear(feat, embedding_dim)
        else:
            self.embed = nn.Sequential(nn.Linear(feat, feat, bias=False), nn.BatchNorm1d(feat), nn.ReLU(inplace=True),
                                       nn.Linear(feat, embedding_dim))
        self.embedding_dim = embedding_dim
        self.feature_dim = feat
        self.embed_relu = embed_relu
        self.normalize = normalize
        self.in_channels = in_channels
        self.backbone_family, self.backbone_name, self.head_prefixes = trunk.family, trunk.name, trunk.head_prefixes
        self.data_config = trunk.data_config
        # the input this network was trained on (set when a stage's checkpoint is loaded) and the one it is served
        # (set by the stage or command that feeds it another datamodule's batches): plain attributes, not state
        self.input_spec: InputSpec | None = None
        self.served_input: InputSpec | None = None
        hub = self.weights_source
        if hub and hub[0] == "hub" and trunk.family in ("local", "torchvision"):
            self.data_config = torchvision_data_config(trunk.name, in_channels, hub[1])
        if load_weights:
            self.load_backbone_weights()

    def load_backbone_weights(self) -> None:
        """Load the trunk's pretrained weights (``weights`` / ``pretrained``), if any were asked for.

        Raises:
            ValueError: The file is missing or unreadable, its keys do not fit the trunk (the missing and
                unexpected keys are named), or hub weights could not be downloaded (offline).
        """
        if self.weights_source is None:
            return
        kind, value = self.weights_source
        what = f"{self.backbone_name!r}"
        if kind == "file":
            load_weights(self.trunk, read_state_dict(value), value, what, self.head_prefixes)
            return
        family = "torchvision" if self.backbone_family == "local" else self.backbone_family
        state = hub_state_dict(family, self.backbone_name, value, self.in_channels)
        load_weights(self.trunk, state, f"of {family}'s {self.backbone_name} {value}", what, self.head_prefixes)

    def serve(self, served: InputSpec | None) -> None:
        """Read batches prepared as ``served`` from now on, converted to this network's own input
        (:func:`~fct_lightning.models.inputs.convert`); nothing to convert when they are equal, or when either
        is unknown (a checkpoint written before inputs were recorded)."""
        if served is None or self.input_spec is None or served == self.input_spec:
            self.served_input = None
            return
        check_convertible(served, self.input_spec, f"the {self.backbone_name} model")
        self.served_input = served

    def forward(self, x: Tensor) -> Tensor:
        """Embed a batch of images: ``[B, C, H, W] -> [B, embedding_dim]``."""
        if self.served_input is not None and self.input_spec is not None:
            x = convert(x, self.served_input, self.input_spec)
        z = self.embed(self.trunk(x).flatten(1))
        if self.embed_relu:
            z = F.relu(z)
        if self.normalize:
            z = F.normalize(z, p=2, dim=1)
        return z


def _weights_source(trunk: Trunk, weights: str | None, pretrained: bool) -> tuple[str, str] | None:
    """What :meth:`EmbeddingNet.load_backbone_weights` loads: ``("file", path)``, ``("hub", weights name)`` or
    None; checked at construction (without reading or downloading anything)."""
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"weights={weights!r} must be a file path or a torchvision weights name.")
    if weights and is_weights_file(weights):
        if pretrained:
            raise ValueError(f"pretrained=True and weights={weights!r} both choose the weights; keep one "
                             "(--model.weights PATH loads the file, --model.pretrained true downloads the default).")
        return ("file", weights)
    if not weights and not pretrained:
        return None
    name = weights or "DEFAULT"
    if trunk.family == "timm":
        if name != "DEFAULT":
            raise ValueError(f"weights={weights!r}: timm's weights are chosen by a tag in the name "
                             f"(timm:{trunk.name}.<tag>) with --model.pretrained true, or pass a file path.")
        return ("hub", name)
    if trunk.family in ("local", "torchvision") and trunk.name != "convnet":
        return ("hub", name)
    what = "the small convnet" if trunk.name == "convnet" else f"the class-path backbone {trunk.name}"
    raise ValueError(f"{what} has no pretrained weights of a framework (weights={weights!r}, pretrained="
                     f"{pretrained}); pass --model.weights PATH to a state dict or .safetensors file.")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP ``d -> hidden -> out`` with BatchNorm and ReLU."""

    def __init__(self, in_dim: int = 128, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_classifier(embedding_dim: int, num_classes: int) -> nn.Linear:
    """The bias-free linear classifier that sits on an embedding (its rows are class prototypes)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1.")
    return nn.Linear(embedding_dim, num_classes, bias=False)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["BACKBONES", "HEADS", "BackboneSpec", "EmbeddingNet", "ProjectionHead", "SmallConvNet", "build_trunk",
           "count_parameters", "make_classifier"]
