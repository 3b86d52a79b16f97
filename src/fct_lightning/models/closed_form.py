"""Closed-form transformations old[, side] -> new: least squares (``linear``) and orthogonal Procrustes.

Both are fitted from the same float64 sufficient statistics of the training pairs, accumulated block by block (so a
gallery of any size fits in memory): with ``x = [old, side, 1]`` (the constant column gives the bias) and ``y = new``,
``G = sum x x^T`` (``[p + 1, p + 1]``) and ``C = sum x y^T`` (``[p + 1, q]``) (:class:`Moments`).

* ``linear``: ``y = x W + b`` minimising ``sum ||y - x W - b||^2 + ridge * ||W||_F^2`` (the bias is not penalised, as in
  scikit-learn's ``Ridge``). Without ridge the minimum-norm least-squares solution (``pinv``), so collinear or
  constant embedding dimensions (a ReLU unit that never fires) are no error.
* ``procrustes``: ``y = s (x - mean_old) R + mean_new`` with ``R`` orthogonal (``R = U V^T`` from the SVD of the
  centred ``old^T new``, Schönemann 1966) and ``s = 1`` or, with ``scale=True``, the least-squares isotropic scale
  ``trace(S) / ||old - mean_old||_F^2``. ``center=False`` uses the raw embeddings
  (``scipy.linalg.orthogonal_procrustes`` then gives the same ``R``). Old and new dimensions may differ: ``R``
  ``[p, q]`` then has orthonormal rows
  (``p <= q``: an isometry into the larger new space) or orthonormal columns (``p > q``: the best orthogonal
  projection onto ``q`` dimensions, i.e. Procrustes after a projection chosen with it), still ``U V^T`` of the
  thin SVD.

The fitted maps are ``nn.Module`` s with the interface of :class:`~fct_lightning.models.transformation.Transformation`
(``old_dim``, ``new_dim``, ``side_dim``, ``has_side_info``, ``config``, ``forward(old, side)``, ``transform_stored``),
so ``fct-transform``, the backfilling curves and :func:`~fct_lightning.stages.load_h` use them as they use the MLP h:
``CLOSED_FORM_MAPS[config["kind"]](**rest of config)`` rebuilds one, its ``state_dict`` holds the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CLOSED_FORM_MAPS", "LinearMap", "Moments", "OrthogonalMap", "fit_linear", "fit_procrustes"]


# ----------------------------------------------------------------------------------------------- statistics
class Moments:
    """Float64 sums over training pairs: ``gram = sum x x^T`` and ``cross = sum x y^T`` with ``x = [inputs, 1]``.

    Args:
        in_dim: ``p``, the input width (old dim, plus side-info dim with side-info).
        out_dim: ``q``, the new embedding dim.
        device: Where the sums live (the features' device: one float64 GEMM per block there).
    """

    def __init__(self, in_dim: int, out_dim: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64, device=device)

    @property
    def count(self) -> int:
        return int(round(float(self.gram[-1, -1])))

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add the rows of ``x`` ``[n, p]`` and ``y`` ``[n, q]`` (any float dtype; summed in float64)."""
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be [n, p] and [n, q] with "
                             "the same rows (one pair per item)")
        if x.shape[1] + 1 != self.gram.shape[0] or y.shape[1] != self.cross.shape[1]:
            raise ValueError(f"inputs {tuple(x.shape)} / targets {tuple(y.shape)} do not match the statistics' "
                             f"widths p={self.gram.shape[0] - 1}, q={self.cross.shape[1]}")
        xa = torch.cat([x.to(self.gram.device, torch.float64),
                        torch.ones(len(x), 1, dtype=torch.float64, device=self.gram.device)], dim=1)
        y = y.to(self.gram.device, torch.float64)
        self.gram.addmm_(xa.T, xa)
        self.cross.addmm_(xa.T, y)

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """``(mean_x [p], mean_y [q], Sxx [p, p], Sxy [p, q], n)``: means and centred sums of products."""
        n = self.count
        if n < 1:
            raise ValueError("no training pairs were added: a closed-form fit needs at least one item")
        sx, sy = self.gram[:-1, -1], self.cross[-1]
        sxx = self.gram[:-1, :-1] - torch.outer(sx, sx) / n
        sxy = self.cross[:-1] - torch.outer(sx, sy) / n
        return sx / n, sy / n, sxx, sxy, n


def solve_linear(moments: Moments, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(W [p, q], b [q])`` of the (ridge) least-squares affine map, float64 on the CPU.

    ``ridge = 0`` gives the minimum-norm solution of the normal equations (``pinv(G) C``, i.e. ``pinv(X) Y``);
    ``ridge > 0`` solves ``(G + ridge * D) theta = C`` with ``D`` the identity without its bias entry.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0 (the weight of ||W||^2; 0 = plain least squares)")
    gram, cross = moments.gram.cpu(), moments.cross.cpu()
    if moments.count < 1:
        raise ValueError("no training pairs were added: a closed-form fit needs at least one item")
    if ridge > 0:
        penalty = torch.eye(len(gram), dtype=torch.float64) * ridge
        penalty[-1, -1] = 0.0
        theta = torch.linalg.solve(gram + penalty, cross)
    else:
        theta = torch.linalg.lstsq(gram, cross, driver="gelsd").solution
    return theta[:-1], theta[-1]


def solve_procrustes(moments: Moments, center: bool = True, scale: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(R [p, q], b [q], s)`` of ``y = s x R + b``: R (semi-)orthogonal, ``U V^T`` from the thin SVD of (centred)
    ``x^T y``, float64."""
    mean_x, mean_y, sxx, sxy, _ = moments.centred()
    if not center:
        mean_x, mean_y = torch.zeros_like(mean_x), torch.zeros_like(mean_y)
        sxx, sxy = moments.gram[:-1, :-1], moments.cross[:-1]
    u, sv, vh = torch.linalg.svd(sxy.cpu(), full_matrices=False)
    rotation = u @ vh
    s = torch.tensor(1.0, dtype=torch.float64)
    if scale:
        spread = torch.trace(sxx.cpu())
        if spread <= 0:
            raise ValueError("scale=True needs old embeddings that vary (their centred sum of squares is 0)")
        s = sv.sum() / spread
    bias = mean_y.cpu() - s * mean_x.cpu() @ rotation
    return rotation, bias, s


# ----------------------------------------------------------------------------------------------- the maps
class LinearMap(nn.Module):
    """An affine map ``[old, side] -> new``: one ``nn.Linear`` (so bf16 autocast and int8 quantisation apply).

    Args:
        old_dim: Old embedding dimension.
        new_dim: New embedding dimension.
        side_dim: Side-info dimension, or None for a map of the old embedding alone.
    """

    kind: ClassVar[str] = "linear"
    uncertainty: ClassVar[bool] = False
    uncertainty_head = None

    def __init__(self, old_dim: int, new_dim: int, side_dim: int | None = None) -> None:
        super().__init__()
        for name, value in (("old_dim", old_dim), ("new_dim", new_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if side_dim is not None and (isinstance(side_dim, bool) or not isinstance(side_dim, int) or side_dim < 1):
            raise ValueError(f"side_dim must be a positive integer or None (no side-info), got {side_dim!r}")
        self.old_dim, self.new_dim, self.side_dim = old_dim, new_dim, side_dim
        self.linear = nn.Linear(self.in_dim, new_dim)
        with torch.no_grad():  # the identity-like start: nothing fitted yet
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        self.linear.requires_grad_(False)

    @property
    def in_dim(self) -> int:
        return self.old_dim + (self.side_dim or 0)

    @property
    def has_side_info(self) -> bool:
        return self.side_dim is not None

    @property
    def config(self) -> dict[str, Any]:
        """``{"kind", "old_dim", "new_dim", "side_dim"}``: ``CLOSED_FORM_MAPS[kind](**rest)`` builds the same map."""
        return {"kind": self.kind, "old_dim": self.old_dim, "new_dim": self.new_dim, "side_dim": self.side_dim}

    @property
    def weight(self) -> Tensor:
        """``W`` ``[in_dim, new_dim]`` of ``y = x W + b``."""
        return self.linear.weight.T

    @property
    def bias(self) -> Tensor:
        return self.linear.bias

    def set_affine(self, weight: Tensor, bias: Tensor) -> LinearMap:
        """Set ``W`` ``[in_dim, new_dim]`` and ``b`` ``[new_dim]`` (cast to the module's dtype and device)."""
        if tuple(weight.shape) != (self.in_dim, self.new_dim) or tuple(bias.shape) != (self.new_dim,):
            raise ValueError(f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must be "
                             f"[{self.in_dim}, {self.new_dim}] / [{self.new_dim}]")
        with torch.no_grad():
            self.linear.weight.copy_(weight.T)
            self.linear.bias.copy_(bias)
        return self

    def inputs(self, old: Tensor, side: Tensor | None = None) -> Tensor:
        """``[old, side]`` ``[B, in_dim]`` after checking the shapes against the map's dimensions."""
        if old.dim() != 2 or old.shape[1] != self.old_dim:
            raise ValueError(f"old embeddings must have shape [B, old_dim={self.old_dim}], got {tuple(old.shape)}")
        if self.side_dim is None:
            if side is not None:
                raise ValueError("side-info was passed, but this map was fitted without side-info (side_dim=None)")
            return old
        if side is None or side.dim() != 2 or side.shape != (old.shape[0], self.side_dim):
            got = None if side is None else tuple(side.shape)
            raise ValueError(f"this map takes side-info of shape [B={old.shape[0]}, side_dim={self.side_dim}], "
                             f"got {got}")
        return torch.cat([old, side], dim=1)

    def forward(self, old: Tensor, side: Tensor | None = None) -> Tensor:
        """``[B, old_dim]`` (+ ``[B, side_dim]``) -> ``[B, new_dim]``."""
        return self.linear(self.inputs(old, side))

    def forward_with_uncertainty(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise RuntimeError(f"a closed-form {self.kind} map has no uncertainty head (FastFill's needs the MLP h: "
                           "--stage fastfill)")

    def set_bn_eval(self, frozen: bool = True) -> None:
        """No BatchNorm here (the interface of the MLP h)."""

    @torch.no_grad()
    def transform_stored(self, old: Tensor, side: Tensor | None = None, batch_size: int = 65536,
                         uncertainty: bool = False,
                         out_device: torch.device | str | None = None) -> tuple[Tensor, None]:
        """Apply the map to stored features ``batch_size`` rows at a time (see the MLP h's method of this name)."""
        if uncertainty:
            self.forward_with_uncertainty(old, side)
        if side is not None and len(side) != len(old):
            raise ValueError(f"stored old features have {len(old)} rows but side-info has {len(side)}; they must align")
        dev = self.linear.weight.device
        out_device = dev if out_device is None else out_device
        preds = [self(old[i:i + batch_size].to(dev, torch.float32),
                      None if side is None else side[i:i + batch_size].to(dev, torch.float32)).float().to(out_device)
                 for i in range(0, len(old), batch_size)]
        return torch.cat(preds), None

    def fit(self, moments: Moments, ridge: float = 0.0) -> LinearMap:
        """Set the map to the (ridge) least-squares solution of ``moments`` (see :func:`solve_linear`)."""
        return self.set_affine(*solve_linear(moments, ridge))


class OrthogonalMap(LinearMap):
    """``y = s (x - mean_old) R + mean_new`` with ``R`` orthogonal (stored as the affine map it is); semi-orthogonal
    (orthonormal rows or columns) when the dimensions differ.

    Args:
        old_dim: Old embedding dimension.
        new_dim: New embedding dimension.
        side_dim: Must be None: Procrustes maps one space onto another of its dimension.
    """

    kind: ClassVar[str] = "procrustes"

    def __init__(self, old_dim: int, new_dim: int, side_dim: int | None = None) -> None:
        if side_dim is not None:
            raise ValueError(f"side_dim={side_dim!r}: orthogonal Procrustes maps the old space alone onto the new one "
                             "(side-info would change the input dimension); use the 'linear' family with side-info")
        super().__init__(old_dim, new_dim, None)
        self.register_buffer("scale", torch.ones(()))

    @property
    def rotation(self) -> Tensor:
        """``R`` ``[old_dim, new_dim]`` ((semi-)orthogonal)."""
        return self.weight / self.scale

    def fit(self, moments: Moments, center: bool = True, scale: bool = False) -> OrthogonalMap:  # type: ignore[override]
        """Set the map to the Procrustes solution of ``moments`` (see :func:`solve_procrustes`)."""
        rotation, bias, s = solve_procrustes(moments, center, scale)
        self.scale.fill_(float(s))
        return self.set_affine(s * rotation, bias)


CLOSED_FORM_MAPS: dict[str, type[LinearMap]] = {"linear": LinearMap, "procrustes": OrthogonalMap}
"""Closed-form map classes by the ``kind`` in their ``config``."""


# ----------------------------------------------------------------------------------------------- the functions
ArrayLike = Tensor | np.ndarray


def _blocks(old: Any, new: Any, side: Any, store: Any, batch_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs [b, p], new [b, q])`` blocks from arrays/tensors, or from an opened store's spaces shard by shard."""
    if store is None:
        arrays = [torch.as_tensor(np.asarray(a)) if not isinstance(a, Tensor) else a
                  for a in ([old, new] if side is None else [old, new, side])]
        for a, name in zip(arrays, ("old", "new", "side"), strict=False):
            if a.ndim != 2 or not a.is_floating_point():
                raise ValueError(f"{name} must be a float [n, d] array, got {a.dtype} {tuple(a.shape)}")
        if len({len(a) for a in arrays}) > 1:
            raise ValueError(f"old, new (and side) must list the same items: rows {[len(a) for a in arrays]}")
        o, n, s = arrays[0], arrays[1], arrays[2] if side is not None else None
        for i in range(0, len(o), batch_rows):
            x = o[i:i + batch_rows]
            yield (x if s is None else torch.cat([x, s[i:i + batch_rows].to(x.device)], dim=1)), n[i:i + batch_rows]
        return
    if not all(isinstance(x, str) for x in ([old, new] if side is None else [old, new, side])):
        raise ValueError("with store=..., old, new and side are the store's space names (e.g. old='old', "
                         "new='new', side='side_info')")
    if not callable(getattr(store, "array", None)) or not hasattr(store, "shards"):
        raise ValueError(f"store={store!r} is not an opened store; pass fct_lightning.store.open_store(path)")
    names = [old, new] if side is None else [old, new, side]
    for shard in range(len(store.shards)):
        arrs = [store.array(space, shard) for space in names]
        for i in range(0, len(arrs[0]), batch_rows):
            o, n = (torch.from_numpy(np.asarray(a[i:i + batch_rows], dtype=np.float64)) for a in arrs[:2])
            x = o if side is None else torch.cat([o, torch.from_numpy(np.asarray(arrs[2][i:i + batch_rows],
                                                                               dtype=np.float64))], dim=1)
            yield x, n


def _moments(blocks: Iterable[tuple[Tensor, Tensor]]) -> tuple[Moments, int, int]:
    moments = None
    for x, y in blocks:
        if moments is None:
            moments = Moments(x.shape[1], y.shape[1], x.device)
        moments.add(x, y)
    if moments is None or moments.count < 1:
        raise ValueError("no training pairs: old and new are empty")
    return moments, moments.gram.shape[0] - 1, moments.cross.shape[1]


def _side_dim(side: Any, store: Any) -> int | None:
    if side is None:
        return None
    if store is not None:
        return int(store.array(side, 0).shape[1])
    return int(np.shape(side)[1])


def fit_linear(old: ArrayLike | str, new: ArrayLike | str, side: ArrayLike | str | None = None, *,
               ridge: float = 0.0, store: Any = None, batch_rows: int = 65536) -> LinearMap:
    """Least-squares affine map ``[old, side] -> new`` in closed form (float64 normal equations).

    Args:
        old: Old embeddings ``[n, d_old]`` (numpy or torch), or with ``store`` the name of a store space.
        new: New embeddings of the same items ``[n, d_new]``, or a space name.
        side: Side-info ``[n, d_side]`` (or a space name), or None for a map of the old embedding alone.
        ridge: Weight of ``||W||_F^2`` (the bias is not penalised); 0 = minimum-norm least squares.
        store: An opened store (``fct_lightning.store.open_store(path)``): read shard by shard, ``batch_rows``
            at a time, into the statistics, so memory stays ``O(batch_rows x d + d^2)`` whatever the store's size.
        batch_rows: Rows per block.

    Returns:
        A :class:`LinearMap` (float32, on the CPU) with ``W = map.weight`` ``[d_old + d_side, d_new]`` and
        ``b = map.bias``; ``map(old_rows, side_rows)`` gives their new-space embeddings.

    Example:
        >>> import numpy as np
        >>> old = np.random.default_rng(0).normal(size=(100, 4))
        >>> h = fit_linear(old, old @ np.diag([1.0, 2, 3, 4]) + 1)
        >>> bool(np.allclose(h.weight.numpy(), np.diag([1.0, 2, 3, 4]), atol=1e-4))
        True
    """
    moments, p, q = _moments(_blocks(old, new, side, store, batch_rows))
    side_dim = _side_dim(side, store)
    return LinearMap(p - (side_dim or 0), q, side_dim).fit(moments, ridge)


def fit_procrustes(old: ArrayLike | str, new: ArrayLike | str, *, center: bool = True, scale: bool = False,
                   store: Any = None, batch_rows: int = 65536) -> OrthogonalMap:
    """Orthogonal Procrustes ``old -> new`` in closed form (SVD of the float64 cross-covariance).

    Args:
        old: Old embeddings ``[n, d]`` (numpy or torch), or with ``store`` the name of a store space.
        new: New embeddings of the same items ``[n, q]``, or a space name; ``q != d`` gives a semi-orthogonal ``R``.
        center: Subtract each side's mean first (the map then adds the new mean back); False = the plain
            ``argmin_R ||old R - new||`` of ``scipy.linalg.orthogonal_procrustes``.
        scale: Also fit one isotropic scale ``s`` (``y = s (x - mean_old) R + mean_new``).
        store: An opened store, read shard by shard (see :func:`fit_linear`).
        batch_rows: Rows per block.

    Returns:
        An :class:`OrthogonalMap` (``map.rotation`` is ``R``).
    """
    moments, p, q = _moments(_blocks(old, new, None, store, batch_rows))
    return OrthogonalMap(p, q).fit(moments, center, scale)
