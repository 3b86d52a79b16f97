"""Supervised embedding models: the deployed ``old`` model and the independently trained ``new`` model.

Both are backbone -> embedding -> bias-free classifier, trained with label-smoothed cross-entropy on the
classes the datamodule's ``train_classes`` selects. They are separate classes because they play separate
roles: later stages check that a checkpoint given as the old model really is one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torchmetrics
from torch import Tensor

from fct_lightning.losses import label_smoothed_cross_entropy
from fct_lightning.models.backbones import EmbeddingNet, make_classifier
from fct_lightning.stages.base import ImageModelStage


class EmbeddingModel(ImageModelStage):
    """Backbone + embedding + classifier, trained with label-smoothed cross-entropy.

    Args:
        classes: Class indices this model is trained on (the datamodule's ``train_class_ids``; the CLI links
            it). Classifier row ``j`` belongs to class ``classes[j]``.
        in_channels: Image channels (linked from the datamodule by the CLI).
        backbone: ``resnet18``, ``resnet34``, ``resnet50``, ``convnet``, any torchvision classification model's
            name, ``timm:<name>``, or an ``nn.Module`` class path (``class_path``/``init_args`` in YAML); see
            :mod:`fct_lightning.models.backbones`.
        embedding_dim: Embedding size (the FCT paper uses 128).
        cifar_stem: 3x3 stride-1 stem without max-pool, for 32 px images (ResNet-style models).
        embed_relu: ReLU on the embedding, as the FCT reference does.
        normalize: L2-normalise the embedding.
        width: Width of the small ConvNet backbone.
        label_smoothing: Label smoothing of the cross-entropy.
        head: Embedding head on the pooled feature: ``linear`` or ``mlp``.
        weights: Pretrained backbone weights: a state dict (``torch.save``) or ``.safetensors`` file, or a
            torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``); loaded when fitting starts.
        pretrained: The framework's default pretrained weights (torchvision / timm; needs internet the first
            time, else pass ``weights``).
        freeze_backbone: Train only the head and classifier; the backbone stays in eval mode (BatchNorm too).
        backbone_lr_scale: The backbone's learning rate as a fraction of ``lr`` (e.g. 0.1 for fine-tuning).
        **kwargs: The dataset name and optimiser settings of
            :class:`~fct_lightning.stages.base.RetrievalStage`.
    """

    role: ClassVar[str] = ""

    def __init__(
        self,
        classes: list[int],
        in_channels: int = 3,
        backbone: str | torch.nn.Module = "resnet18",
        embedding_dim: int = 128,
        cifar_stem: bool = False,
        embed_relu: bool = False,
        normalize: bool = False,
        width: int = 32,
        label_smoothing: float = 0.1,
        head: str = "linear",
        weights: str | None = None,
        pretrained: bool = False,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
            raise ValueError(f"classes={classes} must be a non-empty list of distinct non-negative class indices.")
        self.save_hyperparameters()
        self.classes = classes
        self.label_smoothing = label_smoothing
        self.net = EmbeddingNet(backbone, embedding_dim, in_channels, cifar_stem, embed_relu, normalize, width,
                                head=head, weights=weights, pretrained=pretrained, load_weights=False)
        self.classifier = make_classifier(embedding_dim, len(classes))
        self.configure_backbone(freeze_backbone, backbone_lr_scale)
        # one entry per class index up to the largest, plus a last -1 that every label outside them maps to
        row = torch.full((max(classes) + 2,), -1, dtype=torch.long)
        row[torch.tensor(classes)] = torch.arange(len(classes))
        self.register_buffer("class_to_row", row, persistent=False)
        # validate_args=False: the value checks read the labels back from the device on every update.
        # Training accuracy is summed on the device per step (see log_accuracy), not with torchmetrics.
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes=len(classes), average="micro", validate_args=False)

    def rows_of(self, labels: Tensor) -> Tensor:
        """Classifier rows of ``labels``; -1 for classes this model was not trained on."""
        # a clamp and a gather: a label below 0 reads the table's last entry (-1), one above its largest class
        # index the same entry; no boolean indexing, so no wait for the device
        return self.class_to_row[labels.clamp(-1, self.class_to_row.numel() - 1)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        rows = self.check_rows(labels)
        logits = self.classifier(self.net(images))
        loss = label_smoothed_cross_entropy(logits, rows, self.label_smoothing)
        self.check_loss(loss, f"{self.stage} cross-entropy")
        self.log_accuracy(logits, rows)
        self.log_loss("loss", loss, len(labels))
        return loss

    def log_accuracy(self, logits: Tensor, rows: Tensor) -> None:
        """Add the batch's correct predictions to the epoch's ``train/acc`` (averaged over ranks under DDP)."""
        self.add_to_epoch_total("train/acc", (logits.detach().argmax(1) == rows).sum(), len(rows))

    def check_rows(self, labels: Tensor) -> Tensor:
        """Classifier rows of training ``labels``; a label outside the model's classes is an error.

        On CPU the error is raised at once and names the labels. On a GPU the check is deferred (see
        :attr:`deferred_check_every`) and the offending rows are clamped to 0 until it is read back.
        """
        rows = self.rows_of(labels)
        problem = (f"a training batch has labels outside the model's classes {self.classes}; the datamodule's "
                   "train_classes must match the model's classes.")
        if not self.deferring(rows.device):
            if (rows < 0).any():
                bad = sorted(set(labels[rows < 0].tolist()))
                raise ValueError(problem.replace("labels", f"labels {bad}", 1))
            return rows
        self._defer("labels", rows.amin(), problem)  # fails when negative
        return rows.clamp_min(0)

    # ----------------------------------------------------------------- evaluation
    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {f"{self.role}/{self.role}": (self.role, self.role)}

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        return {self.role: self.net(images)}

    def query_embed(self, images: Tensor) -> Tensor:
        return self.net(images)

    def gallery_embed(self, images: Tensor) -> Tensor:
        return self.net(images)

    def validation_extra(self, embeddings: dict[str, Tensor], labels: Tensor) -> None:
        rows = self.rows_of(labels)
        seen = rows >= 0
        if seen.any():
            self.val_acc.update(self.classifier(embeddings[self.role][seen]), rows[seen])
            self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, batch_size=int(seen.sum()))

    def fct_metadata(self) -> dict[str, Any]:
        meta = super().fct_metadata()
        meta.update(classes=self.classes, embedding_dim=self.embedding_dim)
        return meta


class OldModel(EmbeddingModel):
    """The deployed model: its embeddings fill the stored gallery. Usually trained on a subset of classes."""

    stage = "old"
    role = "old"


class NewModel(EmbeddingModel):
    """The new, better model, trained as usual (no compatibility constraint) on all classes."""

    stage = "new"
    role = "new"
