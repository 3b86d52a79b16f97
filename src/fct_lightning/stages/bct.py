"""The BCT baseline (Shen et al., CVPR 2020): a new model made compatible with the old one by training.

Loss = label-smoothed CE of the new classifier + ``bct_weight`` x the influence loss: cross-entropy of the
*frozen old classifier* applied to the new embedding. Classes the old model never saw get old-classifier
rows synthesised as the mean old embedding of that class's training images (computed once at fit start,
stored in the checkpoint). ``query_embed`` = BCT model, ``gallery_embed`` = old model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fct_lightning.losses import (
    bct_influence_loss,
    label_smoothed_cross_entropy,
    synthesize_classifier_rows,
)
from fct_lightning.stages.base import freeze
from fct_lightning.stages.checkpoints import check_dims
from fct_lightning.stages.embedding import EmbeddingModel
from fct_lightning.stages.loading import load_stage


class BCTModel(EmbeddingModel):
    """Backward-compatible new model (stage ``bct``).

    Args:
        old_checkpoint: The old model's checkpoint (default ``artifacts/<dataset>/old/best.ckpt``).
        bct_weight: Weight lambda of the influence loss.
        **kwargs: Everything :class:`~fct_lightning.stages.embedding.EmbeddingModel` takes.
    """

    stage = "bct"
    role = "bct"
    frozen_prefixes = ("old_net", "old_classifier")

    def __init__(self, classes: list[int], old_checkpoint: str = "", bct_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(classes, **kwargs)
        self.save_hyperparameters()
        if bct_weight < 0:
            raise ValueError(f"bct_weight={bct_weight} must be >= 0.")
        self.old_checkpoint, self.bct_weight = old_checkpoint, bct_weight
        n_rows = max(self.classes) + 1
        self.register_buffer("old_weight", torch.zeros(n_rows, self.embedding_dim))
        self.register_buffer("old_weight_ready", torch.tensor(False))
        self.old_net: torch.nn.Module | None = None
        self.old_classifier: torch.nn.Module | None = None
        self.old_meta: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        if self.old_net is None:
            old, self.old_meta = load_stage(self.old_checkpoint, "old", ("old",), self.dataset or None)
            check_dims(self.embedding_dim, old.embedding_dim, "the old embedding", self.old_checkpoint,
                       "BCT needs equal old and new embedding dimensions: set --model.embedding_dim to the old "
                       "model's.")
            self.old_net = freeze(old.net).to(self.device)
            self.old_classifier = freeze(old.classifier)
            self._old_classes = old.classes
        self.check_frozen_classes()

    def fct_metadata(self) -> dict[str, Any]:
        return {**super().fct_metadata(), "old_digest": self.old_meta.get("digest")}

    def frozen_inputs(self) -> dict[str, dict[str, Any]]:
        # the old classifier rows built at fit start come back from a resumed checkpoint: they must be this old model's
        return {"old": self.old_meta}

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if bool(self.old_weight_ready):
            return
        dm = self.trainer.datamodule
        embs, labels = [], []
        for images, y, _ in dm.eval_dataloader("train", classes=self.classes, all_ranks=True):
            embs.append(self.old_net(images.to(self.device)))
            labels.append(y.to(self.device))
        emb, lab = torch.cat(embs), torch.cat(labels)
        # under DDP every rank computes the same full table from the whole split; it is small (classes x dim)
        full = synthesize_classifier_rows(
            self.old_classifier.weight.to(self.device), self._old_classes, emb, lab, len(self.old_weight)
        )
        self.old_weight.copy_(full)
        self.old_weight_ready.fill_(True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        rows = self.check_rows(labels)
        emb = self.net(images)
        logits = self.classifier(emb)
        ce = label_smoothed_cross_entropy(logits, rows, self.label_smoothing)
        influence = bct_influence_loss(emb, self.old_weight, labels)
        loss = ce + self.bct_weight * influence
        self.check_loss(loss, "bct")
        self.log_accuracy(logits, rows)
        self.log_loss("loss", loss, len(labels))
        self.log_loss("influence", influence, len(labels))
        return loss

    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {"bct/old": ("bct", "old"), "bct/bct": ("bct", "bct"), "old/old": ("old", "old")}

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        out = {"bct": self.net(images)}
        if self.old_net is not None:
            out["old"] = self.old_net(images)
        return out

    def gallery_embed(self, images: Tensor) -> Tensor:
        if self.old_net is None:
            raise RuntimeError("the BCT gallery is the old model's: call setup() first to load the old checkpoint")
        return self.old_net(images)
