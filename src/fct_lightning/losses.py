"""Loss functions for every stage, as pure functions.

Shapes use ``B`` for the batch, ``C`` for classes, ``D`` for the embedding dimension.
Nothing here keeps state or touches the distributed process group: callers pass the tensors the loss
should see (for example, already gathered across ranks for :func:`nt_xent`).

References:
    * Label smoothing: Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016.
    * NT-Xent: Chen et al., "A Simple Framework for Contrastive Learning" (SimCLR), ICML 2020.
    * BCT: Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020.
    * FCT: Ramanujan et al., "Forward Compatible Training for Large-Scale Embedding Retrieval", CVPR 2022.
    * FastFill: Jaeckle et al., "FastFill: Efficient Compatible Model Update", ICLR 2023.
    * Supervised contrastive: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bct_influence_loss",
    "check_finite",
    "fastfill_loss",
    "label_smoothed_cross_entropy",
    "nt_xent",
    "supervised_contrastive",
    "synthesize_classifier_rows",
    "transformation_loss",
]

_REDUCTIONS = ("mean", "none")
_TRANSFORMATION_KINDS = ("mse", "cosine")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {_REDUCTIONS}")


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    return per_item.mean() if reduction == "mean" else per_item


def _check_logits_target(logits: Tensor, target: Tensor, logits_name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{logits_name} must have shape [B, C], got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape [B] = [{logits.shape[0]}] to match {logits_name} "
            f"{tuple(logits.shape)}, got shape {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def _check_pair(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.dim() != 2:
        raise ValueError(f"{a_name} must have shape [B, D], got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape [B, D], "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float = 0.1, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy with uniform label smoothing.

    Per item: ``(1 - eps) * (-log p[target]) + eps * mean_c(-log p[c])``, which equals
    ``F.cross_entropy(logits, target, label_smoothing=eps)``.

    Args:
        logits: Unnormalised class scores, shape ``[B, C]``.
        target: Class indices in ``[0, C)``, shape ``[B]``, integer dtype.
        smoothing: Label-smoothing ``eps`` in ``[0, 1)``; 0 is plain cross-entropy.
        reduction: ``"mean"`` (scalar) or ``"none"`` (shape ``[B]``).

    Returns:
        The loss: a scalar for ``"mean"``, shape ``[B]`` for ``"none"``.

    Raises:
        ValueError: On a bad ``smoothing``, ``reduction``, shape or dtype.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    # PyTorch's fused path (fewer kernels than writing the two terms out); fp32 whatever the autocast dtype
    return F.cross_entropy(logits.float(), target.long(), label_smoothing=smoothing, reduction=reduction)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR normalised-temperature cross-entropy (NT-Xent) over two views.

    The ``2B`` projections are L2-normalised; for anchor ``i`` the positive is the other view of the same
    item and the negatives are the other ``2B - 2`` projections (self-similarity is excluded)::

        l(i) = -log( exp(sim(i, pos(i)) / t) / sum_{k != i} exp(sim(i, k) / t) )

    and the loss is the mean of ``l`` over all ``2B`` anchors.

    Under DDP, pass tensors already gathered across ranks (for example
    ``LightningModule.all_gather(z, sync_grads=True).flatten(0, 1)`` for both views, gathered the same
    way so row ``i`` of ``z1`` and of ``z2`` are the same item); negatives then come from the global batch.

    Args:
        z1: Projections of the first view, shape ``[B, D]``.
        z2: Projections of the second view, shape ``[B, D]``; row ``i`` is the same item as ``z1[i]``.
        temperature: Softmax temperature ``t > 0``.

    Returns:
        Scalar loss (float32).

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``temperature <= 0``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_pair(z1, z2, "z1", "z2")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), p=2, dim=1)
    sim = (z @ z.t()) / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(b, device=z.device)
    positives = torch.cat([idx + b, idx])
    return F.cross_entropy(sim, positives)


def supervised_contrastive(anchors: Tensor, candidates: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-model supervised contrastive loss: each anchor (e.g. ``F(old(x_i))``) is pulled towards the candidates
    of its class (e.g. the new model's embeddings ``new(x_j)``, ``y_j = y_i``, its own pair included) and pushed from
    the rest of the batch::

        l(i) = -1/|P(i)| sum_{p in P(i)} log( exp(a_i . c_p / t) / sum_j exp(a_i . c_j / t) )

    with ``a``, ``c`` L2-normalised; the loss is the mean of ``l`` over the anchors. Every anchor has at least its
    own pair as a positive, so no anchor is left out.

    Args:
        anchors: ``[B, D]``.
        candidates: ``[B, D]``; row ``i`` is the same item as ``anchors[i]``.
        labels: ``[B]`` integer class labels (all >= 0).
        temperature: Softmax temperature ``t > 0``.

    Returns:
        Scalar loss (float32).

    Raises:
        ValueError: If the shapes differ, a label is negative (unknown), or ``temperature <= 0``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_pair(anchors, candidates, "anchors", "candidates")
    if labels.shape != anchors.shape[:1]:
        raise ValueError(f"labels must be [B={anchors.shape[0]}], got {tuple(labels.shape)}")
    if bool((labels < 0).any()):
        raise ValueError("the supervised contrastive term needs every item's label; some are unknown (negative)")
    a = F.normalize(anchors.float(), p=2, dim=1)
    c = F.normalize(candidates.float(), p=2, dim=1)
    log_prob = torch.log_softmax(a @ c.t() / temperature, dim=1)
    positive = (labels[:, None] == labels[None, :]).float()
    return (-(log_prob * positive).sum(1) / positive.sum(1)).mean()


def bct_influence_loss(
    new_embedding: Tensor, old_classifier_weight: Tensor, target: Tensor, smoothing: float = 0.0
) -> Tensor:
    """BCT influence loss: the frozen old classifier applied to the new embedding.

    ``logits = new_embedding @ old_classifier_weight.T`` (no bias), then (label-smoothed) cross-entropy.
    Gradients flow into ``new_embedding`` only; the old weight is detached.

    Args:
        new_embedding: New-model embeddings, shape ``[B, D]``.
        old_classifier_weight: Old classifier matrix, shape ``[C, D]`` (for classes the old model never
            saw, see :func:`synthesize_classifier_rows`).
        target: Class indices in ``[0, C)``, shape ``[B]``.
        smoothing: Label-smoothing ``eps`` in ``[0, 1)``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: If the embedding dimensions differ or shapes are wrong.
    """
    if new_embedding.dim() != 2 or old_classifier_weight.dim() != 2:
        raise ValueError(
            f"new_embedding must be [B, D] and old_classifier_weight [C, D], got shapes "
            f"{tuple(new_embedding.shape)} and {tuple(old_classifier_weight.shape)}"
        )
    d_new, d_old = new_embedding.shape[1], old_classifier_weight.shape[1]
    if d_new != d_old:
        raise ValueError(
            f"new embedding dimension {d_new} != old classifier dimension {d_old}: old and new embedding "
            f"dimensions must match for BCT; set the new model's embedding_dim to {d_old}"
        )
    weight = old_classifier_weight.detach().to(new_embedding.dtype)
    logits = new_embedding @ weight.t()
    return label_smoothed_cross_entropy(logits, target, smoothing=smoothing)


@torch.no_grad()
def synthesize_classifier_rows(
    old_weight: Tensor,
    old_classes: Sequence[int],
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int,
) -> Tensor:
    """Build the old classifier over all ``num_classes`` classes, as BCT does for new classes.

    Row ``j`` of ``old_weight`` belongs to class ``old_classes[j]`` and is copied. A class the old model
    never saw gets the mean old-model embedding of its items. The result is detached (it is frozen).

    Args:
        old_weight: Old classifier matrix, shape ``[C_old, D]``.
        old_classes: Class index of each row of ``old_weight``, length ``C_old``, unique, in
            ``[0, num_classes)``.
        embeddings: Old-model embeddings of (training) items, shape ``[N, D]``.
        labels: Class index of each item, shape ``[N]``.
        num_classes: Total number of classes ``C``.

    Returns:
        Classifier matrix of shape ``[num_classes, D]``, dtype and device of ``old_weight``.

    Raises:
        ValueError: On bad shapes or class indices, or when a class has neither an old row nor any item.
    """
    if old_weight.dim() != 2:
        raise ValueError(f"old_weight must have shape [C_old, D], got {tuple(old_weight.shape)}")
    c_old, d = old_weight.shape
    classes = [int(c) for c in old_classes]
    if len(classes) != c_old:
        raise ValueError(f"old_classes has {len(classes)} entries but old_weight has {c_old} rows")
    if len(set(classes)) != len(classes):
        raise ValueError(f"old_classes must be unique, got {classes}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"old_classes {bad} are outside [0, num_classes={num_classes})")
    if embeddings.dim() != 2 or embeddings.shape[1] != d:
        raise ValueError(
            f"embeddings must have shape [N, {d}] to match old_weight {tuple(old_weight.shape)}, "
            f"got {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape [N] = [{embeddings.shape[0]}], got {tuple(labels.shape)}")
    labels = labels.to(device=old_weight.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, num_classes={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    emb = embeddings.detach().to(device=old_weight.device, dtype=torch.float64)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=old_weight.device)
    sums.index_add_(0, labels, emb)
    counts = torch.bincount(labels, minlength=num_classes)
    seen = torch.zeros(num_classes, dtype=torch.bool, device=old_weight.device)
    seen[classes] = True
    missing = ((~seen) & (counts == 0)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"classes {missing} have no row in old_weight and no items in labels; "
            "pass embeddings of at least one item of every class the old model did not see"
        )
    weight = (sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)).to(old_weight.dtype)
    weight[classes] = old_weight.detach()
    return weight


def transformation_loss(pred: Tensor, target: Tensor, kind: str = "mse", reduction: str = "mean") -> Tensor:
    """Regression loss between transformed old embeddings and new embeddings.

    ``"mse"``: mean squared error over dimensions (``reduction="mean"`` equals ``F.mse_loss``).
    ``"cosine"``: ``1 - cos(pred, target)``.

    Args:
        pred: ``h(old, side)``, shape ``[B, D]``.
        target: New-model embeddings, shape ``[B, D]``.
        kind: ``"mse"`` or ``"cosine"``.
        reduction: ``"mean"`` (scalar) or ``"none"`` (per item, shape ``[B]``).

    Returns:
        Scalar for ``"mean"``, shape ``[B]`` for ``"none"``.

    Raises:
        ValueError: On a bad ``kind``, ``reduction`` or shapes.
    """
    if kind not in _TRANSFORMATION_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {_TRANSFORMATION_KINDS}")
    _check_reduction(reduction)
    _check_pair(pred, target, "pred", "target")
    if kind == "mse":
        per_item = (pred.float() - target.float()).pow(2).mean(dim=1)
    else:
        per_item = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=1)
    return _reduce(per_item, reduction)


#: how FastFill's L_sim reduces the squared errors over dimensions
SIMILARITY_REDUCTIONS = ("mean", "sum")


def fastfill_loss(
    pred: Tensor,
    target: Tensor,
    log_var: Tensor,
    *,
    discriminative_logits: Tensor | None = None,
    labels: Tensor | None = None,
    smoothing: float = 0.1,
    use_similarity: bool = True,
    use_discriminative: bool = True,
    similarity_reduction: str = "mean",
) -> Tensor:
    """FastFill uncertainty-weighted transformation loss.

    Per item ``i`` with predicted log-variance ``s_i``::

        l(i) = 0.5 * exp(-s_i) * (L_sim(i) + L_disc(i)) + 0.5 * s_i

    and the loss is the mean over items. ``L_sim`` is the per-item squared error averaged over dimensions
    (``similarity_reduction="mean"``, the ``F.mse_loss`` convention) or summed over them (``"sum"``: the squared
    L2 distance ``||new - h||^2`` as the paper writes it, ``D`` times larger, so it weighs as much as ``L_disc`` in
    what the uncertainty learns instead of ``1/D`` of it). ``L_disc`` is the per-item label-smoothed cross-entropy of
    the frozen new classifier applied to ``pred`` (the caller computes ``discriminative_logits``).

    Args:
        pred: ``h(old, side)``, shape ``[B, D]``.
        target: New-model embeddings, shape ``[B, D]``.
        log_var: Predicted log-variance ``s``, shape ``[B]`` or ``[B, 1]``.
        discriminative_logits: New classifier applied to ``pred``, shape ``[B, C]``.
        labels: Class indices, shape ``[B]``.
        smoothing: Label smoothing for ``L_disc``.
        use_similarity: Include ``L_sim``.
        use_discriminative: Include ``L_disc``.
        similarity_reduction: ``"mean"`` or ``"sum"`` of ``L_sim``'s squared errors over dimensions.

    Returns:
        Scalar loss.

    Raises:
        ValueError: If both terms are off, ``L_disc`` lacks its inputs, or shapes are wrong.
    """
    if not (use_similarity or use_discriminative):
        raise ValueError("fastfill_loss needs use_similarity or use_discriminative (or both) to be True")
    if similarity_reduction not in SIMILARITY_REDUCTIONS:
        raise ValueError(f"similarity_reduction={similarity_reduction!r} is not known; choose from "
                         f"{SIMILARITY_REDUCTIONS}")
    _check_pair(pred, target, "pred", "target")
    b = pred.shape[0]
    if log_var.shape not in ((b,), (b, 1)):
        raise ValueError(f"log_var must have shape [{b}] or [{b}, 1], got {tuple(log_var.shape)}")
    s = log_var.reshape(b).float()
    per_item = torch.zeros(b, dtype=torch.float32, device=pred.device)
    if use_similarity:
        sim = transformation_loss(pred, target, "mse", reduction="none")
        per_item = per_item + (sim * pred.shape[1] if similarity_reduction == "sum" else sim)
    if use_discriminative:
        if discriminative_logits is None or labels is None:
            raise ValueError(
                "use_discriminative=True needs discriminative_logits (the new classifier applied to pred) "
                "and labels; pass them or set use_discriminative=False"
            )
        if discriminative_logits.dim() != 2 or discriminative_logits.shape[0] != b:
            raise ValueError(
                f"discriminative_logits must have shape [{b}, C], got {tuple(discriminative_logits.shape)}"
            )
        per_item = per_item + label_smoothed_cross_entropy(
            discriminative_logits, labels, smoothing=smoothing, reduction="none"
        )
    return (0.5 * torch.exp(-s) * per_item + 0.5 * s).mean()


def check_finite(loss: Tensor, what: str, step: int | None = None) -> None:
    """Stop training on a NaN or infinite loss.

    Note that on an accelerator this synchronises with the host (one ``.item()``).

    Args:
        loss: The loss tensor (any shape).
        what: What the loss is of, for the message (e.g. ``"transformation"``).
        step: The global step, for the message.

    Raises:
        FloatingPointError: If any element of ``loss`` is NaN or infinite.
    """
    if bool(torch.isfinite(loss).all()):
        return
    kind = "NaN" if bool(torch.isnan(loss).any()) else "inf"
    at = "" if step is None else f" at step {step}"
    raise FloatingPointError(
        f"loss of {what} is {kind}{at}; lower the learning rate, check the input data, "
        "or enable gradient clipping with --trainer.gradient_clip_val 1.0"
    )
