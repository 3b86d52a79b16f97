"""Neighbour search: who is close to whom, independent of labels.

Two engines compute distances between a block of queries and the whole gallery:

* ``"torch"``: exact squared Euclidean distances computed in float64 (``|q|^2 + |g|^2 - 2 q.g``) from the
  float32 embeddings and rounded once to float32. Because float64 rounding errors (~1e-16) are far below the
  float32 spacing (~6e-8), the rounded values, and hence the rankings, are the same on CPU and CUDA and for any
  chunking. This is the *canonical* distance.
* ``"faiss"``: FAISS flat indexes (``IndexFlatL2`` / ``IndexFlatIP``, GPU versions when FAISS has GPUs and the
  data is on CUDA). FAISS computes in float32, so for top-k :func:`search` its candidates are re-scored with the
  canonical distance and the top-k boundary is certified against FAISS's float32 error bound; rows that cannot
  be certified are recomputed exactly with torch. ``search`` therefore returns the same neighbours whichever
  backend runs it.

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
FAISS_GPU_MAX_K = 2048
_U32 = 2.0**-24  # float32 unit roundoff
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


def _faiss_index(gallery: Tensor, distance: str) -> Any:
    """Build a flat FAISS index over ``gallery`` (GPU index when possible and the data is on CUDA)."""
    global _gpu_resources
    faiss = faiss_module()
    d = gallery.shape[1]
    index = faiss.IndexFlatIP(d) if distance == "cosine" else faiss.IndexFlatL2(d)
    if gallery.device.type == "cuda" and faiss_num_gpus() > 0:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        device_id = gallery.device.index if gallery.device.index is not None else torch.cuda.current_device()
        index = faiss.index_cpu_to_gpu(_gpu_resources, device_id, index)
    index.add(np.ascontiguousarray(gallery.cpu().numpy()))
    return index


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


def _default_chunk(num_gallery: int, device: torch.device, bytes_per_item: int = 32) -> int:
    budget = (1 << 30) if device.type == "cuda" else (256 << 20)
    return max(1, budget // (bytes_per_item * num_gallery))


def _torch_topk(q: Tensor, g: Tensor, k: int, self_offset: int | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    gn = squared_norms(g)
    index = torch.arange(g.shape[0], device=g.device)
    out_d, out_i = [], []
    for start in range(0, q.shape[0], chunk_size):
        d = canonical_distances(q[start:start + chunk_size], g, gn)
        keys = ordering_keys(d, index)
        if self_offset is not None:
            rows = torch.arange(d.shape[0], device=d.device)
            keys[rows, rows + start + self_offset] = torch.iinfo(torch.int64).max
        top = torch.topk(keys, k, dim=1, largest=False, sorted=True).values
        idx = top & 0xFFFFFFFF
        out_i.append(idx)
        out_d.append(d.gather(1, idx))
    return torch.cat(out_d), torch.cat(out_i)


def _rescore(q: Tensor, g: Tensor, idx: Tensor) -> Tensor:
    """Canonical squared L2 distances for given (query row, gallery index) pairs: ``[c, m]`` float32.

    The same rule as :func:`canonical_distances`, pair by pair: the expansion, except for near-coincident pairs,
    which are recomputed from their difference (else near-duplicates get other distances than the torch
    backend gives them, and exact ties break by rounding noise instead of by gallery index).
    """
    q64 = q.to(torch.float64)
    cand = g.to(torch.float64)[idx]  # [c, m, d]
    qn, cn = squared_norms(q64).unsqueeze(1), (cand * cand).sum(2)
    d = (cn - 2.0 * torch.einsum("cd,cmd->cm", q64, cand)).add_(qn)
    near = d < _NEAR * (qn + cn)
    if bool(near.any()):
        r, c = near.nonzero(as_tuple=True)
        d[r, c] = (q64[r] - cand[r, c]).pow_(2).sum(1)
    return d.clamp_(min=0.0).to(torch.float32).abs_()


def _faiss_candidates(num_gallery: int, k: int, exclude_self: bool) -> int:
    """How many candidates the FAISS path asks for, to re-rank exactly and certify the top ``k``."""
    return min(num_gallery, k + max(k, 32) + int(exclude_self))


def _faiss_topk(q: Tensor, g: Tensor, k: int, distance: str, exclude_self: bool) -> tuple[Tensor, Tensor]:
    num_g = g.shape[0]
    m = _faiss_candidates(num_g, k, exclude_self)
    if q.device.type == "cuda" and faiss_num_gpus() > 0 and m > FAISS_GPU_MAX_K:
        raise ValueError(f"k={k} needs {m} FAISS-GPU candidates, above FAISS-GPU's limit of {FAISS_GPU_MAX_K}; "
                         "use backend='torch' for such large k.")
    approx_np, cand_np = _faiss_index(g, distance).search(np.ascontiguousarray(q.cpu().numpy()), m)
    gmax = g.norm(dim=1).max().double()
    step = max(1, (128 << 20) // (m * g.shape[1] * 8))
    out_d, out_i = [], []
    for s in range(0, q.shape[0], step):
        qc = q[s:s + step]
        cand = torch.from_numpy(cand_np[s:s + step]).to(q.device)
        approx = torch.from_numpy(approx_np[s:s + step]).to(q.device, torch.float64)
        if distance == "cosine":  # IP similarities -> squared L2 of (nearly) unit vectors
            approx = 2.0 - 2.0 * approx
        invalid = cand < 0
        if exclude_self:
            invalid |= cand == torch.arange(s, s + qc.shape[0], device=q.device).unsqueeze(1)
        safe = cand.clamp(min=0)
        exact = _rescore(qc, g, safe)
        keys = ordering_keys(exact, safe).masked_fill_(invalid, torch.iinfo(torch.int64).max)
        pos = torch.topk(keys, k, dim=1, largest=False, sorted=True).indices
        idx, dist = safe.gather(1, pos), exact.gather(1, pos)
        # Certify the top-k boundary: a non-candidate has FAISS float32 distance >= the last candidate's, so its
        # exact distance is at least that minus FAISS's rounding bound. Uncertified rows are recomputed exactly.
        if m < num_g:
            tol = 4.0 * (q.shape[1] + 8) * _U32 * (qc.norm(dim=1).double() + gmax) ** 2 + 1e-6
            last = approx[:, -1].masked_fill(cand[:, -1] < 0, float("inf"))
            unsure = ~(dist[:, -1].double() < last - tol)
            for b in unsure.nonzero().squeeze(1).tolist():  # rare
                row = s + b
                dq, iq = _torch_topk(q[row:row + 1], g, k, row if exclude_self else None, 1)
                dist[b], idx[b] = dq[0], iq[0]
            if bool(unsure.any()):
                log.debug("FAISS top-%d: recomputed %d uncertified queries exactly", k, int(unsure.sum()))
        out_d.append(dist)
        out_i.append(idx)
    return torch.cat(out_d), torch.cat(out_i)


def search(query: Tensor | np.ndarray, gallery: Tensor | np.ndarray, k: int, distance: str = "l2",
           backend: str = "auto", *, exclude_self: bool = False,
           chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k nearest gallery items for each query.

    Ties in distance are broken by gallery index (lower first); both backends return the same neighbours.

    Args:
        query: Query embeddings ``[Q, d]`` (torch tensor on CPU/CUDA, or numpy array).
        gallery: Gallery embeddings ``[G, d]`` on the same device as ``query``.
        k: Number of neighbours, >= 1. If fewer gallery items are available, all of them are returned.
        distance: ``"l2"`` (squared Euclidean) or ``"cosine"`` (L2-normalise both sides, p=2, then L2).
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see :func:`resolve_backend`).
        exclude_self: If True, query ``i`` and gallery ``i`` are the same item and that pair is skipped
            (requires ``Q == G``).
        chunk_size: Queries per block for the torch backend; None picks one from a memory budget.

    Returns:
        ``(distances, indices)``: float32 squared L2 distances and int64 gallery indices, both ``[Q, k']`` with
        ``k' = min(k, G - exclude_self)``, sorted by ``(distance, index)``, on ``query``'s device.

    Raises:
        ValueError: On bad shapes, values or options. ImportError: ``backend="faiss"`` without FAISS.
    """
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery")
    check_pair(q, g)
    check_choice(distance, "distance", DISTANCES)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer.")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(f"exclude_self=True needs len(query) == len(gallery), got {q.shape[0]} and {g.shape[0]}; "
                         "pass exclude_self=False for separate query and gallery sets.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None.")
    engine = resolve_backend(backend, q.device)
    q, g = prepare(q, distance), prepare(g, distance)
    k_eff = min(int(k), g.shape[0] - int(exclude_self))
    if k_eff < 1:
        empty = torch.empty(q.shape[0], 0, device=q.device)
        return empty, empty.long()
    gpu_faiss = engine == "faiss" and q.device.type == "cuda" and faiss_num_gpus() > 0
    if backend == "auto" and gpu_faiss and _faiss_candidates(g.shape[0], k_eff, exclude_self) > FAISS_GPU_MAX_K:
        engine = "torch"  # FAISS-GPU caps k at 2048 candidates
    log.debug("search: backend=%s k=%d distance=%s", engine, k_eff, distance)
    chunk = chunk_size or _default_chunk(g.shape[0], q.device)
    if engine == "torch":
        return _torch_topk(q, g, k_eff, 0 if exclude_self else None, chunk)
    return _faiss_topk(q, g, k_eff, distance, exclude_self)
