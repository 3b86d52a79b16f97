"""The side-information model: a task-agnostic feature learned contrastively at old-model time.

Recipe (the FCT reference publishes no training code for this model; this is ours):
SimCLR (Chen et al., 2020) on the *old* training images only, without labels. Each image is augmented twice
(the datamodule's ``views=2``); the backbone embedding (``embedding_dim``, 128 by default) is the side-info
feature; a 2-layer MLP projection head maps it to the space where NT-Xent with temperature ``temperature``
pulls the two views together and pushes all other images of the (globally gathered) batch apart. The
projection head is discarded after training. Its own retrieval quality is logged as case ``side/side``.

Without training (``side_source="frozen"``): a frozen pretrained feature extractor (``backbone`` + ``weights``, its
trunk frozen) reduced to ``embedding_dim`` by a linear map fitted once when fitting starts, set as the embedding
head's weights (so the checkpoint, ``fct-embed`` and the transformation stage's frozen side-info model give the same
embeddings with no new code path):

* ``reduce="pca"``: principal components of the trunk features of the training images (evaluation view, the
  stage's classes), from the exact float64 covariance (eigendecomposition; each component's largest entry made
  positive, so the map is a function of the data); ``z = (f - mean) @ components.T``.
* ``reduce="random"``: a Gaussian random projection seeded by ``projection_seed`` (entries
  ``N(0, 1 / embedding_dim)``, so squared norms are kept in expectation), no data needed.

The run is one epoch of no-op steps (a learning rate of 0, nothing trainable) so that Lightning validates and writes
``best.ckpt``; ``side/side`` is logged as for SimCLR. The trade-off against SimCLR: no training (minutes instead of
hours), but the feature is only as task-agnostic as the pretrained model, and like any side-info it must be computed
while the images are at hand (at old-model time, for every gallery item).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fct_lightning.losses import nt_xent
from fct_lightning.models.backbones import EmbeddingNet, ProjectionHead
from fct_lightning.stages.base import ImageModelStage


class SideInfoModel(ImageModelStage):
    """Contrastive side-information model (stage ``side_info``).

    Args:
        in_channels: Image channels (linked from the datamodule by the CLI).
        classes: Classes of the images it is trained on (recorded in the checkpoint; labels are not used).
        backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``convnet``, any torchvision classification model's
            name, ``timm:<name>``, or an ``nn.Module`` class path (``class_path``/``init_args`` in YAML); see
            :mod:`fct_lightning.models.backbones`.
        embedding_dim: Size of the side-info feature.
        cifar_stem: 3x3 stride-1 stem for 32 px images (ResNet-style models).
        width: Width of the small ConvNet backbone.
        projection_dim: Output size of the projection head.
        projection_hidden: Hidden size of the projection head.
        temperature: NT-Xent temperature.
        head: Embedding head on the pooled feature: ``linear`` or ``mlp``.
        weights: Pretrained backbone weights: a state dict (``torch.save``) or ``.safetensors`` file, or a
            torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``); loaded when fitting starts.
        pretrained: The framework's default pretrained weights (torchvision / timm; needs internet the first
            time, else pass ``weights``).
        freeze_backbone: Train only the embedding and projection heads; the backbone stays in eval mode.
        backbone_lr_scale: The backbone's learning rate as a fraction of ``lr``.
        side_source: ``simclr`` (train contrastively, above) or ``frozen`` (no training: the frozen trunk's
            features reduced by ``reduce``; the trunk is frozen whatever ``freeze_backbone`` says, ``head`` must be
            ``linear``, the SimCLR options are unused).
        reduce: ``frozen`` only: ``pca`` (fitted on the training images' features) or ``random`` (seeded).
        projection_seed: ``frozen`` with ``reduce="random"``: the projection's seed (named apart from the
            datamodule's ``seed``: Lightning logs both modules' hyperparameters together and refuses one name with two
            values, which ``--seed N`` gave; checkpoints of the older name ``seed`` load as this).
        **kwargs: The dataset name and optimiser settings of
            :class:`~fct_lightning.stages.base.RetrievalStage`.
    """

    stage = "side_info"
    renamed_hparams: ClassVar[dict[str, str]] = {"seed": "projection_seed"}

    def __init__(
        self,
        in_channels: int = 3,
        classes: list[int] | None = None,
        backbone: str | nn.Module = "resnet18",
        embedding_dim: int = 128,
        cifar_stem: bool = False,
        width: int = 32,
        projection_dim: int = 128,
        projection_hidden: int = 512,
        temperature: float = 0.1,
        head: str = "linear",
        weights: str | None = None,
        pretrained: bool = False,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        side_source: str = "simclr",
        reduce: str = "pca",
        projection_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        if side_source not in SIDE_SOURCES:
            raise ValueError(f"side_source={side_source!r} is not known; choose one of {SIDE_SOURCES}.")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not known; choose one of {REDUCTIONS}.")
        if side_source == "frozen" and head != "linear":
            raise ValueError(f"side_source='frozen' sets a linear map as the embedding head; head={head!r} must be "
                             "'linear'.")
        self.save_hyperparameters()
        self.classes = None if classes is None else [int(c) for c in classes]
        self.temperature = temperature
        self.net = EmbeddingNet(backbone, embedding_dim, in_channels, cifar_stem, width=width, head=head,
                                weights=weights, pretrained=pretrained, load_weights=False)
        self.side_source, self.reduce, self.projection_seed = side_source, reduce, int(projection_seed)
        self.frozen = side_source == "frozen"
        if self.frozen:
            self.projection: nn.Module | None = None
            self.configure_backbone(True, 1.0)
            self.net.embed.requires_grad_(False)
            self.automatic_optimization = False
            self.register_buffer("reduction_fitted", torch.tensor(False))
            self.register_buffer("explained_variance", torch.tensor(float("nan"), dtype=torch.float64))
        else:
            self.projection = ProjectionHead(embedding_dim, projection_hidden, projection_dim)
            self.configure_backbone(freeze_backbone, backbone_lr_scale)

    def _gather(self, z: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return z
        return self.all_gather(z, sync_grads=True).flatten(0, 1)

    # ----------------------------------------------------------------- frozen: fit once, no training
    def setup(self, stage: str) -> None:
        """Frozen: one no-op batch per epoch instead of the (augmented, two-view) training images."""
        if self.frozen and stage == "fit":
            self.trainer.datamodule.serve_training_batches([{"frozen_side_info": torch.ones(1)}])

    @torch.no_grad()
    def on_train_start(self) -> None:
        """Frozen: fit the reduction (once; a resumed run keeps the fitted one) and set it as the embedding head."""
        if not self.frozen or bool(self.reduction_fitted):
            return
        embed, feat = self.net.embed, self.net.feature_dim
        if self.reduce == "random":
            weight = random_projection(feat, self.embedding_dim, self.projection_seed)
            bias, explained = None, float("nan")
        else:
            n, total, gram = 0, torch.zeros(feat, dtype=torch.float64, device=self.device), None
            loader = self.trainer.datamodule.eval_dataloader("train", classes=self.classes, all_ranks=True)
            for images, _, _ in loader:
                f = self.net.trunk(images.to(self.device)).flatten(1).double()
                gram = f.T @ f if gram is None else gram.addmm_(f.T, f)
                total += f.sum(0)
                n += len(f)
            weight, mean, explained = pca_from_moments(gram, total, n, self.embedding_dim)
            bias = -(weight @ mean)
        embed.weight.copy_(weight.to(embed.weight))
        embed.bias.copy_(torch.zeros_like(embed.bias) if bias is None else bias.to(embed.bias))
        self.explained_variance.fill_(explained)
        self.reduction_fitted.fill_(True)

    def configure_optimizers(self) -> Any:
        """Frozen: a learning rate of 0 and no gradient; its steps count ``global_step``, without which Lightning's
        checkpointing would save no ``best.ckpt``."""
        if not self.frozen:
            return super().configure_optimizers()
        return torch.optim.SGD(self.net.embed.parameters(), lr=0.0)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.frozen else super().trainable_parameters()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.frozen:  # fitted in on_train_start
            self.optimizers().step()
            return None
        views, _, _ = batch
        if views.dim() != 5 or views.shape[1] != 2:
            raise ValueError(
                "side_info needs two augmented views per image (a [B, 2, C, H, W] batch) "
                f"but got {tuple(views.shape)}; "
                "set --data.views 2."
            )
        b = views.shape[0]
        z = self.projection(self.net(views.flatten(0, 1))).view(b, 2, -1)
        loss = nt_xent(self._gather(z[:, 0]), self._gather(z[:, 1]), self.temperature)
        self.check_loss(loss, "side_info NT-Xent")
        self.log_loss("loss", loss, b)
        return loss

    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {"side/side": ("side", "side")}

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        return {"side": self.net(images)}

    def query_embed(self, images: Tensor) -> Tensor:
        return self.net(images)

    def gallery_embed(self, images: Tensor) -> Tensor:
        return self.net(images)

    def fct_metadata(self) -> dict[str, Any]:
        meta = super().fct_metadata()
        meta.update(classes=self.classes, embedding_dim=self.embedding_dim, side_source=self.side_source)
        if self.frozen:
            explained = float(self.explained_variance)
            meta.update(reduce=self.reduce, explained_variance=None if math.isnan(explained) else explained)
        return meta


SIDE_SOURCES = ("simclr", "frozen")
REDUCTIONS = ("pca", "random")


def pca_from_moments(gram: Tensor, total: Tensor, n: int, dim: int) -> tuple[Tensor, Tensor, float]:
    """Principal components from the sums of ``n`` feature rows ``f``: ``gram = sum f^T f`` ``[F, F]`` and
    ``total = sum f`` ``[F]`` (float64). Returns ``(components [dim, F], mean [F], explained variance fraction)``,
    components by decreasing variance, each with its largest-magnitude entry positive.

    Raises:
        ValueError: ``dim`` larger than the feature size ``F``, or fewer than two rows.
    """
    feat = gram.shape[0]
    if dim > feat:
        raise ValueError(f"embedding_dim={dim} is larger than the frozen backbone's feature size {feat}: PCA keeps at "
                         f"most {feat} components; set --model.embedding_dim <= {feat}.")
    if n < 2:
        raise ValueError(f"PCA needs at least two training images, got {n}.")
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
    comps = vectors[:, -dim:].flip(1).T.contiguous()
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    var = values.clamp_min(0)
    explained = float(var[-dim:].sum() / var.sum()) if float(var.sum()) > 0 else float("nan")
    return comps, mean, explained


def random_projection(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """A Gaussian random projection ``[out_dim, in_dim]`` with entries ``N(0, 1 / out_dim)``, from ``seed`` alone (the
    same on every machine and rank)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64) / math.sqrt(out_dim)


