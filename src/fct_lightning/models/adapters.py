"""λ-orthogonality adapters (Ricci et al., NeurIPS 2025): a forward adapter F (old -> new) and a backward adapter B
(new -> old) kept near orthogonal, both trained on frozen embeddings.

* ``F(old[, side]) -> new`` maps the stored gallery into the new model's space, as the FCT h does: an MLP of h's
  layout (:class:`~fct_lightning.models.transformation.Transformation`) or one affine layer (``forward_kind``).
* ``B(new) -> old`` is one affine layer ``y = x W^T + b`` (``W`` = ``[old_dim, new_dim]``), square or rectangular.
  Kept near an isometry by ``λ ||G - I||_F^2`` on the smaller Gram matrix of ``W`` (:func:`orthogonality_penalty`):
  distances between new-model queries are then (nearly) preserved when they are mapped into the old space, so a new
  model can search the *untouched old gallery* (backward compatibility without retraining the new model).

Production applies B to the **query** embeddings (``backward(h, new_queries)``), never to the gallery: the gallery
keeps its old embeddings (case ``B/old``), or is moved to the new space by F (``fct-transform``, case ``new/F``).

:class:`Adapters` holds both and has the interface of the MLP h (``old_dim``, ``new_dim``, ``side_dim``,
``has_side_info``, ``config``, ``forward(old, side)`` = F, ``transform_stored``), so ``fct-transform`` and
:func:`~fct_lightning.stages.load_h` use it as they use h: ``ADAPTER_MAPS[config["kind"]](**rest of config)``
rebuilds it, its ``state_dict`` holds F and B.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fct_lightning.models.closed_form import LinearMap, Moments, solve_procrustes
from fct_lightning.models.transformation import Transformation

__all__ = ["ADAPTER_MAPS", "FORWARD_KINDS", "Adapters", "adapter_loss", "backward", "orthogonality_penalty",
           "procrustes_backward"]

FORWARD_KINDS = ("mlp", "linear")


def orthogonality_penalty(weight: Tensor) -> Tensor:
    """``||G - I||_F^2`` with ``G`` the smaller Gram matrix of ``weight`` ``[out, in]`` (an ``nn.Linear``'s).

    ``out >= in``: ``G = W^T W`` ``[in, in]`` (orthonormal columns, an isometry ``R^in -> R^out``); otherwise
    ``G = W W^T`` ``[out, out]`` (orthonormal rows, a projection). Zero exactly for a (semi-)orthogonal ``W``.

    Example:
        >>> float(orthogonality_penalty(torch.eye(3)[:, :2]))
        0.0
        >>> float(orthogonality_penalty(2 * torch.eye(2)))  # (4 - 1)^2 * 2
        18.0
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a [out, in] matrix, got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    gram = weight.T @ weight if out >= inp else weight @ weight.T
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


@torch.no_grad()
def procrustes_backward(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The (semi-)orthogonal affine map new -> old that best fits the pairs after centring (orthogonal Procrustes):
    ``(weight [old_dim, new_dim], bias [old_dim])`` for ``y = x W^T + b``.

    The closed-form ``procrustes`` family's solution (:func:`~fct_lightning.models.closed_form.solve_procrustes` of
    the pairs' float64 :class:`~fct_lightning.models.closed_form.Moments`) with new as input and old as target:
    ``W = R^T`` has orthonormal rows or columns (the orthogonality penalty is 0 at it) and ``b = mean_old - W
    mean_new``. ``pairs`` are blocks ``(new [n, new_dim], old [n, old_dim])`` of the same items.

    Example:
        >>> rot = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
        >>> new = torch.randn(50, 4, dtype=torch.float64)
        >>> w, b = procrustes_backward([(new, new @ rot.T + 1.0)])
        >>> bool(torch.allclose(w, rot, atol=1e-8)) and bool(torch.allclose(b, torch.ones(4, dtype=torch.float64)))
        True
    """
    moments = None
    for new, old in pairs:
        if moments is None:
            moments = Moments(new.shape[1], old.shape[1], new.device)
        moments.add(new, old)
    if moments is None or moments.count < 2:
        raise ValueError("Procrustes needs at least 2 pairs of new and old embeddings")
    rotation, bias, _ = solve_procrustes(moments)  # old ~ new R + b, R [new_dim, old_dim]
    return rotation.T, bias


def adapter_loss(pred_new: Tensor, new: Tensor, pred_old: Tensor, old: Tensor, backward_weight: Tensor,
                 orth_weight: float = 1.0, back_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """``MSE(F(old), new) + back_weight * MSE(B(new), old) + orth_weight * ||G_B - I||_F^2``.

    Args:
        pred_new: ``F(old[, side])`` ``[N, new_dim]``.
        new: The new model's embeddings ``[N, new_dim]``.
        pred_old: ``B(new)`` ``[N, old_dim]``.
        old: The old model's embeddings ``[N, old_dim]``.
        backward_weight: B's matrix ``[old_dim, new_dim]``.
        orth_weight: λ, the weight of the orthogonality penalty (0 = plain regression).
        back_weight: Weight of the backward regression term.

    Returns:
        ``(total, {"forward": ..., "backward": ..., "orth": ...})`` (the terms unweighted, for logging).
    """
    if pred_new.shape != new.shape or pred_old.shape != old.shape:
        raise ValueError(f"F(old) {tuple(pred_new.shape)} must match new {tuple(new.shape)} and B(new) "
                         f"{tuple(pred_old.shape)} must match old {tuple(old.shape)}")
    if not orth_weight >= 0 or not back_weight >= 0:
        raise ValueError(f"orth_weight={orth_weight!r} and back_weight={back_weight!r} must be >= 0")
    parts = {"forward": nnf.mse_loss(pred_new, new), "backward": nnf.mse_loss(pred_old, old),
             "orth": orthogonality_penalty(backward_weight)}
    return parts["forward"] + back_weight * parts["backward"] + orth_weight * parts["orth"], parts


class _LinearForward(LinearMap):
    """F as one trainable affine layer ``[old, side] -> new`` (the closed-form map's layout, learned by SGD)."""

    def __init__(self, old_dim: int, new_dim: int, side_dim: int | None = None) -> None:
        super().__init__(old_dim, new_dim, side_dim)
        self.linear.reset_parameters()
        self.linear.requires_grad_(True)


class Adapters(nn.Module):
    """F (old[, side] -> new) and B (new -> old, affine); ``forward`` is F (the gallery transform).

    Args:
        old_dim: Old embedding dimension.
        new_dim: New embedding dimension.
        side_dim: Side-info dimension (F takes ``[old, side]``), or None.
        forward_kind: ``mlp`` (h's layout) or ``linear`` (one affine layer).
        branch_width_factor: ``mlp``: hidden width of the input branches as a multiple of their input size.
        mixer_width: ``mlp``: width of the mixer layers.
        mixer_depth: ``mlp``: number of hidden mixer layers.
    """

    kind: ClassVar[str] = "orthogonal"
    uncertainty: ClassVar[bool] = False
    uncertainty_head = None

    def __init__(self, old_dim: int, new_dim: int, side_dim: int | None = None, forward_kind: str = "mlp",
                 branch_width_factor: int = 2, mixer_width: int = 2048, mixer_depth: int = 2) -> None:
        super().__init__()
        if forward_kind not in FORWARD_KINDS:
            raise ValueError(f"forward_kind={forward_kind!r} is not known; choose one of {FORWARD_KINDS}")
        if forward_kind == "mlp":
            self.forward_adapter: nn.Module = Transformation(old_dim, new_dim, side_dim, branch_width_factor,
                                                             mixer_width, mixer_depth)
        else:
            self.forward_adapter = _LinearForward(old_dim, new_dim, side_dim)
        self.backward_adapter = nn.Linear(new_dim, old_dim)
        self.old_dim, self.new_dim, self.side_dim = old_dim, new_dim, side_dim
        self.config = {"kind": self.kind, "old_dim": old_dim, "new_dim": new_dim, "side_dim": side_dim,
                       "forward_kind": forward_kind, "branch_width_factor": branch_width_factor,
                       "mixer_width": mixer_width, "mixer_depth": mixer_depth}
        """``ADAPTER_MAPS[kind](**rest)`` builds the same modules."""

    @property
    def has_side_info(self) -> bool:
        return self.side_dim is not None

    def forward(self, old: Tensor, side: Tensor | None = None) -> Tensor:
        """F: ``[B, old_dim]`` (+ ``[B, side_dim]``) -> ``[B, new_dim]``."""
        return self.forward_adapter(old, side)

    def to_old(self, new: Tensor) -> Tensor:
        """B: new-model embeddings ``[B, new_dim]`` -> the old space ``[B, old_dim]``."""
        if new.dim() != 2 or new.shape[1] != self.new_dim:
            raise ValueError(f"new embeddings must have shape [B, new_dim={self.new_dim}], got {tuple(new.shape)}")
        return self.backward_adapter(new)

    def orthogonality(self) -> Tensor:
        """``||G_B - I||_F^2`` of B's matrix (see :func:`orthogonality_penalty`)."""
        return orthogonality_penalty(self.backward_adapter.weight)

    def forward_with_uncertainty(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise RuntimeError("the orthogonal adapters have no uncertainty head (FastFill's needs the MLP h: "
                           "--stage fastfill)")

    def set_bn_eval(self, frozen: bool = True) -> None:
        """Freeze (or release) the BatchNorm statistics of an MLP F (see the MLP h's method of this name)."""
        self.forward_adapter.set_bn_eval(frozen)

    @torch.no_grad()
    def transform_stored(self, old: Tensor, side: Tensor | None = None, batch_size: int = 65536,
                         uncertainty: bool = False,
                         out_device: torch.device | str | None = None) -> tuple[Tensor, None]:
        """F applied to stored features ``batch_size`` rows at a time (see the MLP h's method of this name)."""
        if uncertainty:
            self.forward_with_uncertainty(old, side)
        return self.forward_adapter.transform_stored(old, side, batch_size, out_device=out_device)[0], None


def backward(h: Adapters, new_queries: Tensor, batch_size: int = 65536) -> Tensor:
    """Map new-model **query** embeddings ``[N, new_dim]`` into the old space with B, ``batch_size`` rows at a time.

    The old gallery stays as it is (no backfill, no transformation): search ``backward(h, queries)`` against it.
    ``h`` is an orthogonal checkpoint's adapters, e.g. ``load_h("artifacts/<dataset>/orthogonal/best.ckpt")[0]``.
    """
    if not isinstance(h, Adapters):
        raise ValueError(f"backward() needs the adapters of an orthogonal checkpoint (fct-fit --stage orthogonal), "
                         f"got {type(h).__name__}, which has no backward adapter B")
    dev = h.backward_adapter.weight.device
    with torch.no_grad():
        return torch.cat([h.to_old(new_queries[i:i + batch_size].to(dev, torch.float32))
                          for i in range(0, len(new_queries), batch_size)])


ADAPTER_MAPS: dict[str, type[Adapters]] = {Adapters.kind: Adapters}
"""Adapter classes by the ``kind`` in their ``config``."""
