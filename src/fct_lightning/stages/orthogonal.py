"""The orthogonal stage (λ-orthogonality, Ricci et al., NeurIPS 2025): a forward adapter F (old -> new) and a
backward adapter B (new -> old) kept near orthogonal, trained on the frozen old (side-info) and new models.

Everything but the loss is the transformation stage's
(:class:`~fct_lightning.stages.transformation.TransformationModel`): frozen-model loading, the feature cache (shared
with the transformation when the settings agree), training from images or from stored embeddings (``fct-fit --data
embeddings``), validation, ``best.ckpt`` and ``fct-transform`` (which applies F, the gallery transform). The loss is
:func:`~fct_lightning.models.adapters.adapter_loss`:
``MSE(F(old), new) + back_weight * MSE(B(new), old) + orth_weight * ||G_B - I||_F^2``.

Spaces: ``F`` (``F+side`` with side-info), the old gallery mapped by F, searched by new-model queries (case
``new/F``); and ``B``, new-model queries mapped by B, searched against the untouched old gallery (case ``B/old``:
backward compatibility without re-training the new model or touching the gallery). Store and file names allow no
parentheses, hence ``F`` and ``B`` for the paper's ``F(old)`` and ``B(new)``. A deployment applies B to the query
embeddings (:func:`fct_lightning.models.adapters.backward`), never to the gallery.

``fct-eval`` measures ``new/F`` (and ``new/F+side``) and ``B/old``: it embeds a query space of a stage on frozen
models with the stage's ``backward_embed`` applied to the new model's features (B(new(x)), shared with the ``new``
space), and a gallery space with ``transform(old, side)``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from fct_lightning.losses import supervised_contrastive
from fct_lightning.models.adapters import FORWARD_KINDS, Adapters, adapter_loss, procrustes_backward
from fct_lightning.stages.transformation import TransformationModel

#: the query space of the new model mapped by B into the old space
BACKWARD_SPACE = "B"
#: how B starts (``backward_init``)
BACKWARD_INITS = ("procrustes", "random")


class OrthogonalModel(TransformationModel):
    """F and a near-orthogonal B on frozen old, side-info and new models (stage ``orthogonal``).

    Args:
        use_side_info: F maps ``[old, side]`` (True) or ``old`` alone (default; B never takes side-info: a query has
            none of the gallery's stored side-info).
        forward_kind: F's layout: ``mlp`` (the FCT h's, sized by ``mixer_width``, ``mixer_depth``,
            ``branch_width_factor``) or ``linear`` (one affine layer).
        orth_weight: λ, the weight of B's orthogonality penalty ``||G_B - I||_F^2`` (0 = B unconstrained).
        back_weight: Weight of B's regression term ``MSE(B(new), old)``.
        contrastive_weight: Weight of a supervised contrastive term (Khosla et al.), as the λ-orthogonality paper adds
            to the regression: ``F(old)`` against the new embeddings of the batch and ``B(new)`` against the old
            ones, same-class items as positives (:func:`~fct_lightning.losses.supervised_contrastive`); 0 = off.
        temperature: Its softmax temperature.
        backward_init: How B starts: ``procrustes`` (default: the (semi-)orthogonal least-squares map new -> old of
            the training pairs, solved by SVD at the start of a fresh run, so training starts where the penalty is 0
            and refines it) or ``random`` (``nn.Linear``'s initialisation). With ``random``, the penalty (a sum over
            the Gram matrix) dominates the regression (a mean): B became orthogonal but not aligned, and B/old fell
            below chance on digits (1.1 top-1; the Procrustes map alone gives 94.3).
        mixer_width: ``mlp`` F: width of the mixer layers.
        mixer_depth: ``mlp`` F: number of hidden mixer layers.
        branch_width_factor: ``mlp`` F: hidden width of the branches as a multiple of their input size.
        bn_eval_after: ``mlp`` F: fraction of the epochs after which its BatchNorm layers switch to eval mode.
        **kwargs: What the transformation stage takes, declared there
            (:class:`~fct_lightning.stages.transformation.TransformationModel`): the frozen models' checkpoints, the
            feature cache (``cached``, ``cache_views``, shared with the transformation's when the settings agree,
            ...), ``stored``, the optimiser (AdamW, lr 1e-3 by default) and the dataset name.
    """

    stage = "orthogonal"

    def __init__(
        self,
        use_side_info: bool = False,
        forward_kind: str = "mlp",
        orth_weight: float = 1.0,
        back_weight: float = 1.0,
        backward_init: str = "procrustes",
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        mixer_width: int = 2048,
        mixer_depth: int = 2,
        branch_width_factor: int = 2,
        bn_eval_after: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if forward_kind not in FORWARD_KINDS:
            raise ValueError(f"forward_kind={forward_kind!r} is not known; choose one of {FORWARD_KINDS}")
        if backward_init not in BACKWARD_INITS:
            raise ValueError(f"backward_init={backward_init!r} is not known; choose one of {BACKWARD_INITS}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        for name, value in (("orth_weight", orth_weight), ("back_weight", back_weight),
                            ("contrastive_weight", contrastive_weight)):
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        # the parent's throwaway h is 1 wide: the adapters replace it at once
        super().__init__(use_side_info=use_side_info, mixer_width=1, mixer_depth=1, branch_width_factor=1,
                         bn_eval_after=bn_eval_after, uncertainty=False, **kwargs)
        self.save_hyperparameters()  # this class's arguments (not the throwaway h's the parent recorded)
        self.forward_kind, self.orth_weight, self.back_weight = forward_kind, orth_weight, back_weight
        self.backward_init = backward_init
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.h = Adapters(self.h.old_dim, self.h.new_dim, self.h.side_dim, forward_kind, branch_width_factor,
                          mixer_width, mixer_depth)

    @property
    def gallery_space(self) -> str:
        return "F+side" if self.use_side_info else "F"

    def fct_metadata(self) -> dict[str, Any]:
        meta = super().fct_metadata()
        meta.update(forward_kind=self.forward_kind, orth_weight=self.orth_weight, back_weight=self.back_weight,
                    backward_init=self.backward_init, contrastive_weight=self.contrastive_weight,
                    orthogonality=float(self.h.orthogonality().detach()))
        return meta

    # ----------------------------------------------------------------- embeddings
    def backward_embed(self, new: Tensor) -> Tensor:
        """B(new embeddings): the new model's queries in the old space."""
        return self.h.to_old(new)

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        out = super().eval_embeddings(images)
        return {**out, BACKWARD_SPACE: self.backward_embed(out["new"])}

    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {f"new/{self.gallery_space}": ("new", self.gallery_space),
                f"{BACKWARD_SPACE}/old": (BACKWARD_SPACE, "old"), "old/old": ("old", "old"), "new/new": ("new", "new")}

    def query_embed(self, images: Tensor) -> Tensor:
        """B(new(x)): a new-model query mapped into the old space (searched against the old gallery)."""
        return self.backward_embed(super().query_embed(images))

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = super().validation_step(batch, batch_idx)
        if isinstance(batch, dict):  # stored embeddings: the parent gave old, new and F; add B
            out["embeddings"][BACKWARD_SPACE] = self.backward_embed(out["embeddings"]["new"])
        return out

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def on_train_start(self) -> None:
        """A fresh run with ``backward_init="procrustes"``: B := the Procrustes map new -> old of the training pairs
        (the feature cache, or the stored rows), the same on every rank (rank 0's, broadcast). A resumed run keeps
        the B of its checkpoint."""
        if self.backward_init != "procrustes" or self.trainer.global_step > 0:
            return
        batches = getattr(self, "_feature_loader", None) or getattr(self.trainer.datamodule, "train_batches", None)
        data = getattr(batches, "data", None)
        if data is None:
            rank_zero_warn("orthogonal: training on the fly (no feature cache, no stored rows): B starts from a "
                           "random initialisation; --model.cached true lets it start from the Procrustes map")
            return
        new, old = data["new"].reshape(-1, data["new"].shape[-1]), data["old"].reshape(-1, data["old"].shape[-1])
        rows = 65536
        weight, bias = procrustes_backward((new[i:i + rows], old[i:i + rows]) for i in range(0, len(new), rows))
        layer = self.h.backward_adapter
        weight, bias = self.trainer.strategy.broadcast((weight, bias), src=0)
        layer.weight.copy_(weight.to(layer.weight))
        layer.bias.copy_(bias.to(layer.bias))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            feats, labels = batch, batch["labels"]
        else:
            images, labels, _ = batch
            feats = self.frozen_embeddings(images)
        old, new = feats["old"].float(), feats["new"].float()
        side = feats["side"].float() if self.use_side_info else None
        pred_new, pred_old = self.h(old, side), self.h.to_old(new)
        loss, parts = adapter_loss(pred_new, new, pred_old, old, self.h.backward_adapter.weight, self.orth_weight,
                                   self.back_weight)
        if self.contrastive_weight > 0:
            labels = labels.to(old.device).long()
            parts["contrastive"] = (supervised_contrastive(pred_new, new, labels, self.temperature)
                                    + supervised_contrastive(pred_old, old, labels, self.temperature))
            loss = loss + self.contrastive_weight * parts["contrastive"]
        self.check_loss(loss, "orthogonal")
        self.log_loss("loss", loss, len(labels))
        for name, value in parts.items():
            self.log_loss(name, value.detach(), len(labels), step=False)
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.h.parameters() if p.requires_grad]
