"""Backbones that map images to embeddings, and the bias-free classifier on top.

The ResNets are torchvision's definitions (randomly initialised; no weights are downloaded). For 32 px
images, ``cifar_stem=True`` replaces the 7x7/stride-2 convolution and the max-pool by one 3x3/stride-1
convolution, the usual CIFAR adaptation. The embedding is a linear projection of the pooled feature,
optionally followed by a ReLU (as the FCT reference does) and/or L2 normalisation.
"""

from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "convnet")


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


class EmbeddingNet(nn.Module):
    """Backbone trunk + linear embedding layer.

    Args:
        backbone: One of ``resnet18``, ``resnet34``, ``resnet50`` (torchvision definitions) or ``convnet``.
        embedding_dim: Size of the embedding.
        in_channels: Image channels (1 for digits, 3 for colour images).
        cifar_stem: Use the 3x3/stride-1 stem without max-pool (for 32 px images). ResNets only.
        embed_relu: Apply a ReLU to the embedding (the FCT reference does).
        normalize: L2-normalise the embedding.
        width: Width of the small ConvNet (ignored by ResNets).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        embedding_dim: int = 128,
        in_channels: int = 3,
        cifar_stem: bool = False,
        embed_relu: bool = False,
        normalize: bool = False,
        width: int = 32,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone={backbone!r} is not known; choose one of {BACKBONES}.")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim={embedding_dim} must be a positive integer.")
        if backbone == "convnet":
            self.trunk: nn.Module = SmallConvNet(in_channels, width)
            feat = self.trunk.out_features
        else:
            self.trunk, feat = _resnet_trunk(backbone, in_channels, cifar_stem)
        self.embed = nn.Linear(feat, embedding_dim)
        self.embedding_dim = embedding_dim
        self.feature_dim = feat
        self.embed_relu = embed_relu
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        """Embed a batch of images: ``[B, C, H, W] -> [B, embedding_dim]``."""
        z = self.embed(self.trunk(x))
        if self.embed_relu:
            z = F.relu(z)
        if self.normalize:
            z = F.normalize(z, p=2, dim=1)
        return z


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


__all__ = ["BACKBONES", "EmbeddingNet", "ProjectionHead", "SmallConvNet", "count_parameters", "make_classifier"]
