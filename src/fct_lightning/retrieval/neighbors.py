"""Neighbour search: who is close to whom, independent of labels.

Two engines compute distances between a block of queries and the whole gallery:

* ``"torch"``: exact squared Euclidean distances computed in float64 (``|q|^2 + |g|^2 - 2 q.g``) from the
  float32 embeddings and rounded once to float32. Because float64 rounding errors (~1e-16) are far below the
  float32 spacing (~6e-8), the rounded values, and hence the rankings, are the same on CPU and CUDA and for any
  chunking. This is the *canonical* distance.
* ``"faiss"``: FAISS's pairwise distances (on the GPU when FAISS has GPUs and the data is on CUDA). FAISS
  computes in float32; evaluation re-checks near ties with the canonical distance, so rankings are the same
  whichever backend runs them.

Rankings are ordered by ``(distance, gallery index)``: ties go to the lower gallery index. Distances returned are
squared L2; for ``distance="cosine"`` both sides are L2-normalised (p=2) first, so the value is ``2 - 2 cos``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

DISTANCES = ("l2", "cosine")
BACKENDS = ("auto", "torch", "faiss")
_NEAR = 1e-3  # relative size below which canonical distances are recomputed from the difference
_gpu_resources: Any = None


def as_embeddings(x: Tensor | np.ndarray, name: str) -> Tensor:
    """Convert embeddings to a float32 tensor on their own device and validate them.

    Args:
        x: Embeddings ``[N, d]``, a torch tensor (CPU or CUDA) or a numpy array.
        name: Argument name used in error messages.

    Returns:
        Float32 tensor ``[N, d]``.

    Raises:
        ValueError: If ``x`` is not 2-D, is empty, is not numeric, or holds NaN/inf values.
    """
    t = torch.as_tensor(x) if not isinstance(x, Tensor) else x
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d], got shape {tuple(t.shape)}; "
                         f"reshape it, e.g. {name}.reshape(len({name}), -1).")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one item with d >= 1.")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}; cast it to float32.")
    t = t.detach().to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} has non-finite values (NaN or inf) in {bad} of {t.shape[0]} rows "
                         f"(shape {tuple(t.shape)}); fix or drop those embeddings before evaluating.")
    return t


def check_choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    """Raise ``ValueError`` naming ``name``, ``value`` and ``allowed`` unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")
    return value


def check_pair(query: Tensor, gallery: Tensor) -> None:
    """Check that query ``[Q, d]`` and gallery ``[G, d]`` share ``d`` and a device."""
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query has dimension d={query.shape[1]} (shape {tuple(query.shape)}) but gallery has "
                         f"d={gallery.shape[1]} (shape {tuple(gallery.shape)}); embed both with models that share "
                         "one embedding space (e.g. use the transformed gallery for cross-model search).")
    if query.device != gallery.device:
        raise ValueError(f"query is on {query.device} but gallery is on {gallery.device}; move both to one device.")
    if gallery.shape[0] >= 2**31:
        raise ValueError(f"gallery has {gallery.shape[0]} items; at most 2**31 - 1 are supported.")


def prepare(x: Tensor, distance: str) -> Tensor:
    """Return ``x`` ready for squared-L2 search: unchanged for ``"l2"``, L2-normalised (p=2) for ``"cosine"``."""
    check_choice(distance, "distance", DISTANCES)
    return F.normalize(x, p=2.0, dim=1) if distance == "cosine" else x


def squared_norms(x: Tensor) -> Tensor:
    """Float64 squared norms ``[N]`` of float32 embeddings ``[N, d]``."""
    x64 = x.to(torch.float64)
    return (x64 * x64).sum(dim=1)


def canonical_distances(query: Tensor, gallery: Tensor, gallery_sqnorms: Tensor | None = None) -> Tensor:
    """Exact squared L2 distances, computed in float64 and rounded once to float32.

    Args:
        query: Float32 ``[c, d]``.
        gallery: Float32 ``[G, d]``, or the same values already cast to float64 (faster when called per chunk).
        gallery_sqnorms: Optional precomputed :func:`squared_norms` of ``gallery`` ``[G]``.

    Returns:
        Float32 ``[c, G]``, non-negative (``+0.0`` for coincident points).
    """
    g64 = gallery.to(torch.float64)
    q64 = query.to(torch.float64)
    gn = squared_norms(g64) if gallery_sqnorms is None else gallery_sqnorms
    qn = squared_norms(q64)
    d = torch.addmm(gn.unsqueeze(0), q64, g64.T, beta=1.0, alpha=-2.0)
    d.add_(qn.unsqueeze(1))
    # The expansion cancels badly for near-coincident pairs; recompute those from the difference, so the
    # float32 rounding below does not depend on the device's summation order. The test looks at the pair's own
    # norms only: a pair's distance must not depend on what else is in the gallery (backfilling evaluates
    # galleries that mix two embeddings of each item, and relies on that).
    near = d < (_NEAR * (qn.max() + gn)).unsqueeze(0)  # a superset, without a [c, G] float64 temporary
    if bool(near.any()):
        r, c = near.nonzero(as_tuple=True)
        keep = d[r, c] < _NEAR * (qn[r] + gn[c])
        r, c = r[keep], c[keep]
        step = 1 << 16
        for s in range(0, r.numel(), step):
            rs, cs = r[s:s + step], c[s:s + step]
            d[rs, cs] = (q64[rs] - g64[cs]).pow_(2).sum(1)
    return d.clamp_(min=0.0).to(torch.float32).abs_()


def faiss_module() -> Any:
    """Import FAISS or raise ``ImportError`` with install instructions."""
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or faiss-gpu), "
                          "or use backend='torch'.") from err
    return faiss


def faiss_available() -> bool:
    """Whether FAISS can be imported."""
    try:
        faiss_module()
    except ImportError:
        return False
    return True


def faiss_num_gpus() -> int:
    """Number of GPUs FAISS can use (0 without FAISS or without GPU support)."""
    if not faiss_available():
        return 0
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the concrete backend for top-k :func:`search`.

    ``"auto"`` uses FAISS-GPU for CUDA data when FAISS has GPUs, torch for CUDA data otherwise, and FAISS (CPU)
    for CPU data when it is installed (torch otherwise).
    """
    check_choice(backend, "backend", BACKENDS)
    if backend != "auto":
        if backend == "faiss":
            faiss_module()
        return backend
    if device.type == "cuda":
        return "faiss" if faiss_num_gpus() > 0 else "torch"
    return "faiss" if faiss_available() else "torch"


def faiss_distance_block(query: Tensor, gallery: Tensor) -> Tensor:
    """Squared L2 distances ``[c, G]`` computed by FAISS in float32 (brute force, CPU or GPU).

    Args:
        query: Float32 ``[c, d]`` (already normalised for cosine).
        gallery: Float32 ``[G, d]``.

    Returns:
        Float32 ``[c, G]`` on ``query.device``.
    """
    faiss = faiss_module()
    xq = np.ascontiguousarray(query.cpu().numpy())
    xb = np.ascontiguousarray(gallery.cpu().numpy())
    if query.device.type == "cuda" and faiss_num_gpus() > 0 and hasattr(faiss, "pairwise_distance_gpu"):
        global _gpu_resources
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        out = faiss.pairwise_distance_gpu(_gpu_resources, xq, xb, metric=faiss.METRIC_L2)
    else:
        out = faiss.pairwise_distances(xq, xb, metric=faiss.METRIC_L2)
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(query.device).clamp_(min=0.0).abs_()


def ordering_keys(distances: Tensor, gallery_index: Tensor) -> Tensor:
    """Pack ``(distance, gallery index)`` into unique int64 keys whose order is the canonical ranking.

    Args:
        distances: Non-negative float32 ``[..., G]``.
        gallery_index: Int64 gallery indices broadcastable to ``distances`` (each < 2**31).

    Returns:
        Int64 ``[..., G]``; a smaller key ranks first.
    """
    bits = distances.contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | gallery_index
