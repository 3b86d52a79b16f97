"""The side-information model: a task-agnostic feature learned contrastively at old-model time.

Recipe (the FCT reference publishes no training code for this model; this is ours):
SimCLR (Chen et al., 2020) on the *old* training images only, without labels. Each image is augmented twice
(the datamodule's ``views=2``); the backbone embedding (``embedding_dim``, 128 by default) is the side-info
feature; a 2-layer MLP projection head maps it to the space where NT-Xent with temperature ``temperature``
pulls the two views together and pushes all other images of the (globally gathered) batch apart. The
projection head is discarded after training. Its own retrieval quality is logged as case ``side/side``.
"""

from __future__ import annotations

from typing import Any

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
        **kwargs: The dataset name and optimiser settings of
            :class:`~fct_lightning.stages.base.RetrievalStage`.
    """

    stage = "side_info"

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        self.save_hyperparameters()
        self.classes = None if classes is None else [int(c) for c in classes]
        self.temperature = temperature
        self.net = EmbeddingNet(backbone, embedding_dim, in_channels, cifar_stem, width=width, head=head,
                                weights=weights, pretrained=pretrained, load_weights=False)
        self.projection = ProjectionHead(embedding_dim, projection_hidden, projection_dim)
        self.configure_backbone(freeze_backbone, backbone_lr_scale)

    def _gather(self, z: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return z
        return self.all_gather(z, sync_grads=True).flatten(0, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
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
        meta.update(classes=self.classes, embedding_dim=self.embedding_dim)
        return meta


