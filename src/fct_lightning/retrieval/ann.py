"""Retrieval metrics through a FAISS index: the search a deployed gallery runs, next to the exact evaluation.

:func:`evaluate_index` builds an index of the gallery from a FAISS factory string (``"Flat"``, ``"IVF64,Flat"``,
``"HNSW32"``, ...), searches it for every query's top-k and computes CMC top-k and mAP@R from those hits with
:func:`metrics_from_hits`. Both need only the first ``k`` results of each ranking, so they can be computed through an
index; full-ranking mAP needs the rank of *every* relevant item and stays with the exact path
(:func:`~fct_lightning.retrieval.evaluate`).

Exactness under ``"Flat"``: the exact path ranks by ``(canonical distance, gallery index)``, the canonical distance
being computed in float64 and rounded once to float32 (:mod:`~fct_lightning.retrieval.neighbors`). FAISS computes
float32 distances whose error is bounded by ``delta = (2 d + 16) * 2**-23 * (|q|^2 + max |g|^2)``, so two hits
whose FAISS distances are more than ``2 delta`` apart are already in canonical order. A flat index is therefore
searched for ``k`` plus a margin of hits; hits within ``2 delta`` of a neighbour in their list (near ties, e.g.
duplicated rows) get their canonical distance, and each list is re-sorted by ``(distance, index)``. The first ``k``
re-sorted hits are the exact top-k whenever the ``k``-th FAISS distance is more than ``2 delta`` below the last
retrieved one (no unretrieved item can then come before it); a query for which that fails is ranked exactly
against the whole gallery instead. The metrics are then reduced with the exact path's own arithmetic, in its
query blocks, so top-1 / top-5 / mAP@R through ``"Flat"`` equal :func:`~fct_lightning.retrieval.evaluate`'s
bit for bit. Approximate indexes (IVF, HNSW, PQ, ...) return their own hits, ordered by their own distances.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .evaluate import _as_labels, _check_ks, _check_self, auto_chunk_size
from .metrics import ClassIndex, QueryMetrics, _metrics_from_ranks, build_class_index, concat_metrics, summarize
from .neighbors import (
    _NEAR,
    DISTANCES,
    as_embeddings,
    canonical_distances,
    check_choice,
    check_pair,
    faiss_module,
    faiss_num_gpus,
    ordering_keys,
    prepare,
    squared_norms,
)

log = logging.getLogger(__name__)

_LAST = torch.iinfo(torch.int64).max  # key that ranks after every real hit
_SEARCH_ENTRIES = 1 << 22  # hits per FAISS search call (ids + distances: 48 MiB)
_PAIRS = 1 << 16  # candidate pairs per canonical-distance block ([pairs, d] float64 gathers)
_GATHER_COST = 16  # rough cost of a gathered pair in pairs of a float64 GEMM block (memory-bound gathers)
_GPU_MAX_K = 2048  # FAISS-GPU's largest k (GPU_MAX_SELECTION_K)
_gpu_resources: Any = None


def _error_bound(dim: int) -> float:
    """Relative bound on ``|FAISS float32 squared L2 - canonical|`` in units of ``|q|^2 + |g|^2``: norms, dot
    product (``d`` roundings each, worst case) and the final sums, with a factor 2 to spare."""
    return (2 * dim + 16) * 2.0**-23


def is_flat(index: Any) -> bool:
    """Whether ``index`` is a brute-force FAISS index (every gallery item is scored: the search is exhaustive)."""
    faiss = faiss_module()
    flat = (faiss.IndexFlat, faiss.GpuIndexFlat) if hasattr(faiss, "GpuIndexFlat") else (faiss.IndexFlat,)
    return isinstance(faiss.downcast_index(index), flat)


def build_index(gallery: Tensor, factory: str = "Flat", *, nprobe: int | None = None, train_rows: int | None = None,
                seed: int = 0, gpu: bool = False, search_params: str | None = None) -> Any:
    """A trained FAISS index (squared L2) holding ``gallery``'s rows with ids ``0..G-1``.

    Args:
        gallery: Float32 ``[G, d]``, already prepared for the distance (normalised for cosine).
        factory: FAISS ``index_factory`` string, e.g. ``"Flat"``, ``"IVF64,Flat"``, ``"HNSW32"``.
        nprobe: Inverted lists visited per query (IVF indexes only); None keeps FAISS's default (1).
        train_rows: Rows to train on (indexes that need training), a random sample drawn with ``seed``;
            None trains on the whole gallery.
        seed: Seed of the training sample.
        gpu: Put the index on the GPU (FAISS with GPU support only); an index type FAISS cannot move there
            stays on the CPU, with a warning.
        search_params: More search-time parameters, ``"efSearch=128"`` (:func:`set_search_parameters`).

    Raises:
        ValueError: On a factory string FAISS rejects, too few training rows, or ``nprobe`` on a non-IVF index
            (:func:`set_nprobe`).
    """
    faiss = faiss_module()
    xb = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
    try:
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"index={factory!r} is not a FAISS factory string for d={xb.shape[1]} ({err}); "
                         "use e.g. 'Flat', 'IVF64,Flat' or 'HNSW32'.") from err
    if gpu:
        index = _to_gpu(index, gallery.device)
    if not index.is_trained:
        rows = xb.shape[0] if train_rows is None else min(int(train_rows), xb.shape[0])
        sample = xb if rows == xb.shape[0] else xb[np.random.default_rng(seed).choice(xb.shape[0], rows, replace=False)]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(f"index={factory!r} could not be trained on {rows} rows ({err}); use fewer inverted "
                             "lists or centroids (e.g. 'IVF16,Flat'), or more rows.") from err
    index.add(xb)
    if nprobe is not None:
        set_nprobe(index, nprobe)
    if search_params:
        set_search_parameters(index, search_params)
    return index


def parse_search_parameters(text: str) -> dict[str, float]:
    """``"efSearch=128,nprobe=16"`` -> ``{"efSearch": 128.0, "nprobe": 16.0}`` (FAISS's ParameterSpace syntax)."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        name, eq, value = (part.strip() for part in item.partition("="))
        try:
            out[name] = float(value)
        except ValueError:
            eq = ""
        if not (name and eq):
            raise ValueError(f"search parameters {text!r}: {item!r} is not NAME=NUMBER; give e.g. 'efSearch=128' "
                             "(HNSW), 'nprobe=16' (IVF) or 'nprobe=16,quantizer_efSearch=64', comma-separated")
    return out


def set_search_parameters(index: Any, params: str | dict[str, float]) -> None:
    """Set FAISS search-time parameters on ``index`` (CPU or GPU, also inside id maps and pre-transforms), by
    FAISS's ParameterSpace: ``efSearch`` (HNSW), ``nprobe`` (IVF), ``quantizer_efSearch`` (IVF on an HNSW
    quantizer), ``ht`` (polysemous PQ), ... given as ``"name=value,..."`` or a dict."""
    faiss = faiss_module()
    values = parse_search_parameters(params) if isinstance(params, str) else dict(params)
    space = faiss.GpuParameterSpace() if _on_gpu(index) else faiss.ParameterSpace()
    for name, value in values.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as err:
            kind = type(faiss.downcast_index(index)).__name__
            raise ValueError(f"the search parameter {name}={value:g} does not apply to this {kind} index "
                             f"({str(err).rsplit(':', 1)[-1].strip()}): HNSW indexes take efSearch, IVF ones nprobe "
                             "(and quantizer_efSearch on an HNSW quantizer)") from err


def set_nprobe(index: Any, nprobe: int) -> None:
    """Make the IVF ``index`` (also inside pre-transforms and id maps, or on the GPU) visit ``nprobe`` lists
    per query.

    Raises:
        ValueError: On a non-positive ``nprobe`` or an index without inverted lists.
    """
    if isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer) or nprobe < 1:
        raise ValueError(f"nprobe {nprobe!r} must be a positive integer")
    faiss = faiss_module()
    space = faiss.GpuParameterSpace() if _on_gpu(index) else faiss.ParameterSpace()
    try:
        space.set_index_parameter(index, "nprobe", float(nprobe))
    except RuntimeError as err:
        kind = type(faiss.downcast_index(index)).__name__
        raise ValueError(f"nprobe={nprobe} needs an IVF index; this one is a {kind}: leave --nprobe out "
                         "(HNSW indexes take --search_params efSearch=N)") from err


def _on_gpu(index: Any) -> bool:
    faiss = faiss_module()
    return hasattr(faiss, "GpuIndex") and isinstance(faiss.downcast_index(index), faiss.GpuIndex)


def _to_gpu(index: Any, device: torch.device) -> Any:
    global _gpu_resources
    faiss = faiss_module()
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources, device.index or 0, index)
    except RuntimeError as err:  # e.g. HNSW: FAISS has no GPU version of it
        log.warning("FAISS cannot put this index on the GPU (%s); it is built and searched on the CPU", err)
        return index


def search(index: Any, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """FAISS ``(distances, ids)`` ``[Q, k]`` on ``query.device``, searched in blocks of queries so the hit lists
    of one call stay within 48 MiB."""
    xq = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
    step = max(1, _SEARCH_ENTRIES // k)
    dists, ids = zip(*(index.search(xq[s:s + step], k) for s in range(0, xq.shape[0], step)), strict=True)
    return (torch.from_numpy(np.concatenate(dists)).to(query.device),
            torch.from_numpy(np.concatenate(ids)).to(device=query.device, dtype=torch.int64))


def _candidate_distances(q64: Tensor, qn: Tensor, g64: Tensor, gn: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Canonical distances of the pairs ``(rows[i], cols[i])``, by the same float64 formula as
    :func:`~fct_lightning.retrieval.neighbors.canonical_distances` (expansion, differences for near pairs)."""
    out = torch.empty(rows.numel(), dtype=torch.float32, device=q64.device)
    for s in range(0, rows.numel(), _PAIRS):
        r, c = rows[s:s + _PAIRS], cols[s:s + _PAIRS]
        qr, gc = q64[r], g64[c]
        d = (gn[c] - 2.0 * (qr * gc).sum(1)) + qn[r]
        near = d < _NEAR * (qn[r] + gn[c])
        if bool(near.any()):
            d[near] = (qr[near] - gc[near]).pow_(2).sum(1)
        out[s:s + _PAIRS] = d.clamp_(min=0.0).to(torch.float32).abs_()
    return out


def _sorted_hits(dists: Tensor, ids: Tensor, self_index: Tensor | None, k: int) -> Tensor:
    """The first ``k`` of each row's hits by ``(distance, id)``, the query itself and FAISS's ``-1`` padding
    dropped, as int64 ids ``[c, k]`` (``-1`` where a row has fewer hits)."""
    keys = ordering_keys(dists.clamp(min=0.0).abs_(), ids.clamp(min=0))
    drop = ids < 0
    if self_index is not None:
        drop |= ids == self_index.unsqueeze(1)
    keys = torch.sort(keys.masked_fill_(drop, _LAST), dim=1).values[:, :k]
    return torch.where(keys == _LAST, -1, keys & 0xFFFFFFFF)


def _exact_top_k(query: Tensor, gallery: Tensor, dists: Tensor, ids: Tensor, self_index: Tensor | None,
                 k: int) -> tuple[Tensor, int]:
    """Turn a flat index's hit lists (``k`` plus a margin per query) into the exact top-``k`` of the canonical
    ranking (module docstring). Returns ``(ids [Q, k], number of queries ranked against the whole gallery)``."""
    num_q, n = ids.shape
    q64, g64 = query.to(torch.float64), gallery.to(torch.float64)
    qn, gn = squared_norms(q64), squared_norms(g64)
    tol = 2.0 * _error_bound(query.shape[1]) * (qn + gn.max())  # [Q]: FAISS order is canonical beyond this gap
    gap = dists[:, 1:].double() - dists[:, :-1].double()
    close = gap <= tol.unsqueeze(1)
    near = torch.zeros_like(ids, dtype=torch.bool)
    near[:, 1:] |= close
    near[:, :-1] |= close
    near &= ids >= 0
    exact = dists.clone()
    block = max(1, (64 << 20) // (8 * gallery.shape[0]))  # queries per [block, G] float64 canonical block
    for s in range(0, num_q, block):
        rows, cols = near[s:s + block].nonzero(as_tuple=True)
        cand = ids[s:s + block][rows, cols]
        if rows.numel() * _GATHER_COST > min(block, num_q - s) * gallery.shape[0]:
            # many near ties: one GEMM of the block against the whole gallery is cheaper than gathering the pairs
            full = canonical_distances(query[s:s + block], g64, gn)
            exact[s + rows, cols] = full[rows, cand]
        else:
            exact[s + rows, cols] = _candidate_distances(q64, qn, g64, gn, s + rows, cand)
    hits = _sorted_hits(exact, ids, self_index, k)
    if n >= gallery.shape[0]:  # every item was retrieved: nothing can be missing
        return hits, 0
    # the k-th non-self FAISS distance must be more than 2 delta below the last retrieved one
    own = torch.zeros_like(near) if self_index is None else ids == self_index.unsqueeze(1)
    kth = torch.sort(dists.masked_fill(own, float("inf")), dim=1).values[:, k - 1].double()
    unsure = (~(kth + tol < dists[:, -1].double())).nonzero(as_tuple=True)[0]
    if unsure.numel():
        for s in range(0, unsure.numel(), 256):
            u = unsure[s:s + 256]
            full = canonical_distances(query[u], g64, gn)
            keys = ordering_keys(full, torch.arange(gallery.shape[0], device=full.device))
            if self_index is not None:
                keys[torch.arange(u.numel(), device=keys.device), self_index[u]] = _LAST
            top = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False).values
            top = torch.where(top == _LAST, -1, top & 0xFFFFFFFF)
            hits[u] = torch.nn.functional.pad(top, (0, k - top.shape[1]), value=-1)
    return hits, int(unsure.numel())


def metrics_from_hits(hit_ids: Tensor | np.ndarray, hit_distances: Tensor | np.ndarray | None,
                      query_labels: Tensor | np.ndarray | Sequence[int], gallery_labels: Tensor | np.ndarray,
                      *, self_index: Tensor | np.ndarray | None = None, ks: Sequence[int] = (1, 5),
                      chunk_size: int | None = None) -> dict[str, float]:
    """CMC top-k and mAP@R from each query's ranked hits, with :func:`~fct_lightning.retrieval.evaluate`'s
    conventions and arithmetic.

    Args:
        hit_ids: Int ``[Q, k]`` gallery row ids per query, best first; ``-1`` marks no hit (FAISS's padding).
        hit_distances: Optional ``[Q, k]`` distances of the hits (smaller is closer; for inner-product scores pass
            their negatives): each row is re-ordered by ``(distance, id)``, the exact path's tie rule. None trusts
            the given order.
        query_labels: Integer labels ``[Q]``.
        gallery_labels: Integer labels ``[G]`` of the whole gallery (``R``, the number of relevant items of a query,
            counts all of them, not only those among the hits).
        self_index: Optional int ``[Q]``: the gallery row of each query itself (``-1``: not in the gallery). That
            hit is dropped by id, wherever it is, and that item is not relevant to its query (leave-one-out).
        ks: CMC cut-offs; each must be at most ``k`` (a hit beyond the list cannot be counted).
        chunk_size: Queries per block of the reduction; None uses the exact path's blocks
            (:func:`~fct_lightning.retrieval.auto_chunk_size` of ``G`` on the hits' device), so the float64 sums,
            hence the results, are bit-identical to :func:`~fct_lightning.retrieval.evaluate` given the same hits.

    Returns:
        ``{"top1": ..., "top5": ..., "map@r": ...}``: the exact path's values when every hit list holds the first
        ``max(ks)`` and the first ``R`` items of the query's ranking (self dropped); a shorter list counts the
        missing positions as misses, so mAP@R is then a lower bound. Full-ranking ``map`` needs every relevant
        item's rank and is not computed here.

    Raises:
        ValueError: On mismatched shapes, ids outside the gallery, non-integer labels or a cut-off beyond ``k``.
    """
    ids = hit_ids if isinstance(hit_ids, Tensor) else torch.as_tensor(np.asarray(hit_ids))
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"hit_ids must be an integer [Q, k] array, got {ids.dtype} {tuple(ids.shape)}.")
    dev, ids = ids.device, ids.to(torch.int64)
    ks = _check_ks(ks)
    if max(ks) > ids.shape[1]:
        raise ValueError(f"ks={ks} needs at least {max(ks)} hits per query, hit_ids has k={ids.shape[1]}; "
                         "search for more neighbours or lower ks.")
    ql = _as_labels(query_labels, "query_labels", ids.shape[0], "hit_ids", dev)
    gl = gallery_labels if isinstance(gallery_labels, Tensor) else torch.as_tensor(np.asarray(gallery_labels))
    gl = _as_labels(gl, "gallery_labels", gl.shape[0] if gl.ndim else 0, "gallery_labels", dev)
    num_g = gl.shape[0]
    lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (-1, -1)
    if num_g == 0 or lo < -1 or hi >= num_g:
        raise ValueError(f"hit_ids must hold gallery rows in [0, {num_g}) or -1, got values in [{lo}, {hi}]; "
                         "pass the labels of the whole gallery the hits come from.")
    own = None
    if self_index is not None:
        own = _as_labels(self_index, "self_index", ids.shape[0], "hit_ids", dev)
    if hit_distances is not None:
        d = hit_distances if isinstance(hit_distances, Tensor) else torch.as_tensor(np.asarray(hit_distances))
        if d.shape != ids.shape:
            raise ValueError(f"hit_distances has shape {tuple(d.shape)}, hit_ids {tuple(ids.shape)}; pass one "
                             "distance per hit.")
        d = d.to(device=dev, dtype=torch.float64).masked_fill(ids < 0, float("inf"))
        by_id = torch.sort(ids.masked_fill(ids < 0, num_g), dim=1, stable=True).indices
        by_dist = torch.sort(d.gather(1, by_id), dim=1, stable=True).indices
        ids = ids.gather(1, by_id.gather(1, by_dist))
    if own is not None:  # drop the query itself by id, keeping the order of the rest
        ids = ids.masked_fill(ids == own.unsqueeze(1), -1)
    keep = ids >= 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    ids = ids.gather(1, order)
    classes = build_class_index(gl)
    chunk = chunk_size or auto_chunk_size(num_g, dev)
    parts = [_hit_metrics(ids[s:s + chunk], ql[s:s + chunk], gl, classes,
                          None if own is None else own[s:s + chunk]) for s in range(0, ids.shape[0], chunk)]
    out = summarize(concat_metrics(parts), ks, map_at_r=True)
    del out["map"]
    return out


def _hit_metrics(ids: Tensor, ql: Tensor, gl: Tensor, classes: ClassIndex, own: Tensor | None) -> QueryMetrics:
    """Per-query metrics of one block of hit lists (self already dropped, ``-1`` padding last), built as the
    exact path's ``[c, r_max]`` table of relevant ranks so the same float64 reduction gives the same bits."""
    c, k = ids.shape
    pos = torch.searchsorted(classes.classes, ql).clamp_(max=classes.classes.numel() - 1)
    total = torch.where(classes.classes[pos] == ql, classes.count[pos], 0)
    num_rel = total.clone()
    if own is not None:
        num_rel -= ((own >= 0) & (gl[own.clamp(min=0)] == ql)).to(num_rel.dtype)
    r_max = int(total.max()) if c else 0  # the exact path's table width for this block
    rank = torch.full((c, max(r_max, 1)), _LAST, dtype=torch.int64, device=ids.device)
    rel = (ids >= 0) & (gl[ids.clamp(min=0)] == ql.unsqueeze(1))
    rows, cols = rel.nonzero(as_tuple=True)  # ascending positions within each row
    per_row = torch.bincount(rows, minlength=c)
    within = torch.arange(rows.numel(), device=ids.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    rank[rows, within] = cols + 1
    if r_max == 0:  # as the exact path: no query of this block has a relevant item
        zero = torch.zeros(c, dtype=torch.float64, device=ids.device)
        return QueryMetrics(torch.zeros_like(total), zero, zero.clone(), total)
    metrics = _metrics_from_ranks(rank, num_rel)
    return metrics._replace(first_rank=torch.where(per_row > 0, metrics.first_rank, 0))


def default_k(gallery_labels: Tensor, ks: Sequence[int], exclude_self: bool) -> int:
    """Hits per query that make top-k and mAP@R exact: ``max(ks)`` or the largest ``R`` (class size, less the query
    itself under leave-one-out), whichever is larger."""
    largest = int(torch.unique(gallery_labels, return_counts=True)[1].max())
    return max(max(ks), largest - int(exclude_self))


def evaluate_index(query: Tensor | np.ndarray, query_labels: Tensor | np.ndarray, gallery: Tensor | np.ndarray,
                   gallery_labels: Tensor | np.ndarray, factory: str = "Flat", k: int | None = None,
                   distance: str = "l2", exclude_self: bool = False, nprobe: int | None = None,
                   ks: Sequence[int] = (1, 5), train_rows: int | None = None, seed: int = 0,
                   search_params: str | None = None) -> dict[str, float]:
    """CMC top-k and mAP@R of the queries searched in a FAISS index of the gallery.

    Args:
        query: Query embeddings ``[Q, d]`` (torch, CPU or CUDA, or numpy).
        query_labels: Integer labels ``[Q]``.
        gallery: Gallery embeddings ``[G, d]``, same device as ``query``.
        gallery_labels: Integer labels ``[G]``.
        factory: FAISS ``index_factory`` string; ``"Flat"`` (exhaustive) gives the exact path's numbers.
        k: Hits per query; None: :func:`default_k` (``max(ks)`` or the largest ``R``), which makes mAP@R exact
            under ``"Flat"``. A smaller ``k`` (at least ``max(ks)``) makes mAP@R a lower bound.
        distance: ``"l2"`` or ``"cosine"`` (both sides L2-normalised, p=2), as in the exact path.
        exclude_self: Leave-one-out (``Q == G``, query ``i`` is gallery item ``i``): that item is dropped from its
            query's hits by index, even when its distance is not 0 (cross-model search).
        nprobe: Inverted lists visited per query (IVF indexes).
        ks: CMC cut-offs.
        train_rows: Training sample size for indexes that need training (None: the whole gallery).
        seed: Seed of the training sample.
        search_params: More search-time parameters, e.g. ``"efSearch=128"`` (:func:`set_search_parameters`).

    Returns:
        ``{"top1": ..., "top5": ..., "map@r": ...}`` (one ``top{k}`` per cut-off), python floats in [0, 1].

    The index is on the GPU when FAISS has GPUs and the embeddings are on CUDA (and ``k`` fits FAISS-GPU's limit
    of 2048), on the CPU otherwise.
    """
    ks = _check_ks(ks)
    check_choice(distance, "distance", DISTANCES)
    q, g = as_embeddings(query, "query"), as_embeddings(gallery, "gallery")
    check_pair(q, g)
    ql = _as_labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    gl = _as_labels(gallery_labels, "gallery_labels", g.shape[0], "gallery", g.device)
    _check_self(exclude_self, q, g)
    if k is None:
        k = default_k(gl, ks, exclude_self)
    elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < max(ks):
        raise ValueError(f"k={k!r} must be an integer >= max(ks)={max(ks)}, or None for the exact default.")
    q, g = prepare(q, distance), prepare(g, distance)
    margin = max(8, k // 8)  # extra hits of a flat index, so near ties at the k-th place are seen (module doc)
    gpu = q.device.type == "cuda" and faiss_num_gpus() > 0 and k + 1 + margin <= _GPU_MAX_K
    index = build_index(g, factory, nprobe=nprobe, train_rows=train_rows, seed=seed, gpu=gpu,
                        search_params=search_params)
    flat = is_flat(index)
    wanted = min(g.shape[0], k + int(exclude_self) + (margin if flat else 0))
    dists, ids = search(index, q, wanted)
    self_index = torch.arange(q.shape[0], device=q.device) if exclude_self else None
    if flat:
        hits, unsure = _exact_top_k(q, g, dists, ids, self_index, k)
        log.debug("evaluate_index: %d of %d queries re-ranked against the whole gallery", unsure, q.shape[0])
    else:
        hits = _sorted_hits(dists, ids, self_index, k)
    if hits.shape[1] < max(ks):
        # a gallery with fewer items than the largest cut-off: each list holds all of them, and the missing places
        # count as no hit, so top-k is the exact path's (which ranks the whole, shorter, gallery)
        hits = torch.cat([hits, hits.new_full((hits.shape[0], max(ks) - hits.shape[1]), -1)], dim=1)
    return metrics_from_hits(hits, None, ql, gl, self_index=self_index, ks=ks)
