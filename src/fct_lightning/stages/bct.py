"""The BCT baseline (Shen et al., CVPR 2020): a new model made compatible with the old one by training.

Loss = label-smoothed CE of the new classifier + ``bct_weight`` x the influence loss: cross-entropy of the
*frozen old classifier* applied to the new embedding. Classes the old model never saw get old-classifier
rows synthesised as the mean old embedding of that class's training images (computed once at fit start,
stored in the checkpoint). ``query_embed`` = BCT model, ``gallery_embed`` = old model.

Without the old classifier (``old_classifier="class_means"``: an old model known by its embeddings, or one whose
classifier should not be trusted), every row is synthesised the same way: the (raw, not normalised: the influence
loss uses the rows as they are, as it uses the synthesised rows of new classes) mean old embedding of a class, from
the labelled old embeddings of a store (``old_store``, its ``old`` space) and, for the classes the store lacks, from
the old model's embeddings of this run's training images.
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
from fct_lightning.store import open_store

OLD_CLASSIFIERS = ("checkpoint", "class_means")


class BCTModel(EmbeddingModel):
    """Backward-compatible new model (stage ``bct``).

    Args:
        old_checkpoint: The old model's checkpoint (default ``artifacts/<dataset>/old/best.ckpt``).
        bct_weight: Weight lambda of the influence loss.
        old_classifier: ``checkpoint`` (the old model's classifier; new classes get class means) or
            ``class_means`` (every row a class mean of old embeddings, see the module docstring).
        old_store: ``class_means`` only: a store whose ``old`` space (made by the old model of ``old_checkpoint``:
            its recorded checkpoint digest must match) and labels give the class means; None: the old model's
            embeddings of the training images.
        **kwargs: Everything :class:`~fct_lightning.stages.embedding.EmbeddingModel` takes.
    """

    stage = "bct"
    role = "bct"
    frozen_prefixes = ("old_net", "old_classifier")

    def __init__(self, classes: list[int], old_checkpoint: str = "", bct_weight: float = 1.0,
                 old_classifier: str = "checkpoint", old_store: str | None = None, **kwargs: Any) -> None:
        super().__init__(classes, **kwargs)
        self.save_hyperparameters()
        if bct_weight < 0:
            raise ValueError(f"bct_weight={bct_weight} must be >= 0.")
        if old_classifier not in OLD_CLASSIFIERS:
            raise ValueError(f"old_classifier={old_classifier!r} is not known; choose one of {OLD_CLASSIFIERS}.")
        if old_store and old_classifier != "class_means":
            raise ValueError(f"old_store={old_store!r} gives class means: set old_classifier='class_means' too.")
        self.old_classifier_source, self.old_store = old_classifier, old_store
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
        self.check_frozen_inputs(stage)
        self.serve_frozen_inputs()

    def fct_metadata(self) -> dict[str, Any]:
        meta = {**super().fct_metadata(), "old_digest": self.old_meta.get("digest")}
        if self.old_classifier_source != "checkpoint":
            meta.update(old_classifier=self.old_classifier_source, old_store=self.old_store)
        return meta

    def frozen_inputs(self) -> dict[str, dict[str, Any]]:
        # the old classifier rows built at fit start come back from a resumed checkpoint: they must be this old model's
        return {"old": self.old_meta}

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if bool(self.old_weight_ready):
            return
        if self.old_classifier_source == "class_means":
            self.old_weight.copy_(self.class_mean_rows())
            self.old_weight_ready.fill_(True)
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

    def _old_embeddings(self, classes: list[int]) -> tuple[Tensor, Tensor]:
        """The old model's embeddings of this run's training images of ``classes``, and their labels."""
        embs, labels = [], []
        for images, y, _ in self.trainer.datamodule.eval_dataloader("train", classes=classes, all_ranks=True):
            embs.append(self.old_net(images.to(self.device)))
            labels.append(y.to(self.device))
        return torch.cat(embs), torch.cat(labels)

    def _store_embeddings(self) -> tuple[Tensor, Tensor]:
        """The labelled rows of ``old_store``'s ``old`` space whose labels are classes of this run."""
        store = open_store(self.old_store)
        if "old" not in store.spaces:
            raise ValueError(f"old_store={self.old_store!r} has no 'old' space (it has {sorted(store.spaces)}); embed "
                             "the items with the old model first (fct-embed --store)")
        info, want = store.space("old"), self.old_meta.get("digest")
        check_dims(self.embedding_dim, info.dim, "the stored old embedding", self.old_store,
                   "BCT needs equal old and new embedding dimensions.")
        if info.checkpoint_digest and want and info.checkpoint_digest != want:
            raise ValueError(f"old_store={self.old_store!r}: its old space was made by the model with content "
                             f"{info.checkpoint_digest}, not by old_checkpoint {self.old_checkpoint} ({want}); the "
                             "class means must come from the old model whose gallery BCT stays compatible with")
        embs, labels = [], []
        keep = torch.tensor(sorted(self.classes))
        for i in range(len(store.shards)):
            lab = store.labels(i)
            if lab is None:
                raise ValueError(f"old_store={self.old_store!r} has no labels; class means need labelled items")
            lab = torch.from_numpy(lab)
            mask = torch.isin(lab, keep)
            embs.append(torch.from_numpy(store.array("old", i, mmap=False).astype("float32"))[mask])
            labels.append(lab[mask])
        return torch.cat(embs).to(self.device), torch.cat(labels).to(self.device)

    @torch.no_grad()
    def class_mean_rows(self) -> Tensor:
        """The classifier table ``[max class + 1, D]`` of class means of old embeddings (see the module docstring)."""
        d = self.embedding_dim
        emb, lab = self._store_embeddings() if self.old_store else (
            torch.zeros(0, d, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device))
        missing = sorted(set(self.classes) - set(lab.tolist()))
        if missing:
            more, more_lab = self._old_embeddings(missing)
            emb, lab = torch.cat([emb, more.float()]), torch.cat([lab, more_lab.long()])
        return synthesize_classifier_rows(self.old_weight.new_zeros(0, d), [], emb, lab, len(self.old_weight))

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
