"""The retrieval evaluation entry point: exact CMC top-k, full-ranking mAP and mAP@R in O(chunk x gallery) memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .metrics import (
    QueryMetrics,
    build_class_index,
    concat_metrics,
    key_metrics,
    query_metrics,
    ranking_keys,
    summarize,
)
from .neighbors import (
    BACKENDS,
    DISTANCES,
    as_embeddings,
    canonical_distances,
    check_choice,
    check_pair,
    faiss_distance_block,
    faiss_module,
    prepare,
    squared_norms,
)

log = logging.getLogger(__name__)

_BYTES_PER_PAIR = 64  # float64 GEMM output, float32 distances, int64 keys and sorted keys, dense-path temporaries
_MIX_BYTES_PER_PAIR = _BYTES_PER_PAIR + 16  # evaluate_mixtures also holds both galleries' keys


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's ``malloc_trim`` if available (looked up on first use), else None."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# Below this gallery size the per-chunk temporaries are small and trimming the heap costs more than it saves
# (about 10 % of the time at G = 5,000); above it, trimming keeps peak memory flat.
_TRIM_MIN_GALLERY = 20_000


def _release_heap(device: torch.device) -> None:
    """Return freed chunk buffers to the OS. glibc's adaptive mmap threshold otherwise keeps the repeated
    [chunk, G] temporaries on the heap, and measured peak RSS then grows chunk after chunk (16 GB at G = 50k)."""
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


def _as_labels(x: Tensor | np.ndarray | Sequence[int], name: str, n: int, n_name: str,
               device: torch.device) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}; flatten it.")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {t.dtype}; cast with .long().")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels but {n_name} has {n} rows; pass one label per row.")
    return t.to(device=device, dtype=torch.int64)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks={ks!r} must be a non-empty sequence of positive integers, e.g. (1, 5).")
    return tuple(int(k) for k in ks)


def auto_chunk_size(num_gallery: int, device: torch.device, budget_bytes: int | None = None,
                    bytes_per_pair: int = _BYTES_PER_PAIR) -> int:
    """Queries per block so the working memory stays near ``budget_bytes`` (256 MiB on CPU, 1 GiB on CUDA)."""
    budget = budget_bytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    return max(1, budget // (bytes_per_pair * num_gallery))


def _check_options(distance: str, backend: str, ks: Sequence[int], chunk_size: int | None) -> tuple[int, ...]:
    check_choice(distance, "distance", DISTANCES)
    check_choice(backend, "backend", BACKENDS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None.")
    if backend == "faiss":
        faiss_module()
    return _check_ks(ks)


def _check_self(exclude_self: bool, q: Tensor, g: Tensor) -> None:
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(f"exclude_self=True needs len(query) == len(gallery) (item i is both), got "
                         f"{q.shape[0]} and {g.shape[0]}; pass exclude_self=False for separate sets.")


def _distances_to(g: Tensor, backend: str) -> Callable[[Tensor], Tensor]:
    """A function from a query block ``[c, d]`` to its float32 distances ``[c, G]`` to the prepared gallery ``g``."""
    if backend == "faiss":
        return lambda qc: faiss_distance_block(qc, g)
    g64, gn = g.to(torch.float64), squared_norms(g)  # cast once, not per chunk
    return lambda qc: canonical_distances(qc, g64, gn)


def evaluate(query: Tensor | np.ndarray, query_labels: Tensor | np.ndarray, gallery: Tensor | np.ndarray,
             gallery_labels: Tensor | np.ndarray, *, exclude_self: bool, distance: str = "l2",
             ks: Sequence[int] = (1, 5), backend: str = "auto", chunk_size: int | None = None,
             map_at_r: bool = True) -> dict[str, float]:
    """Exact retrieval metrics of query embeddings against a gallery.

    The gallery is ranked for every query by ``(distance, gallery index)``: ties in distance go to the lower
    gallery index. Queries are processed in chunks, so memory is O(chunk_size x G); no Q x G matrix is built.

    Args:
        query: Query embeddings ``[Q, d]`` (torch tensor on CPU/CUDA, or numpy array).
        query_labels: Integer labels ``[Q]``.
        gallery: Gallery embeddings ``[G, d]``, same device as ``query``.
        gallery_labels: Integer labels ``[G]``.
        exclude_self: If True, query ``i`` and gallery ``i`` are the same item (needs ``Q == G``) and that pair
            is removed from the ranking even when the two embeddings differ (cross-model leave-one-out).
        distance: ``"l2"`` (Euclidean) or ``"cosine"`` (both sides L2-normalised with p=2, then Euclidean).
        ks: CMC cut-offs; one ``top{k}`` key per k. A k beyond the gallery size means "anywhere in the gallery".
        backend: ``"auto"`` or ``"torch"``: exact distances in float64, rounded to float32, on the data's device
            (identical numbers on CPU and CUDA and for any chunk size). ``"faiss"``: FAISS brute-force float32
            distances; agrees with torch up to float32 near-ties (~1e-6 on tie-free data), and is slower on CPU.
            Full-ranking mAP needs every distance, so ``"auto"`` always uses torch here.
        chunk_size: Queries per block; None picks it from a memory budget (:func:`auto_chunk_size`).
        map_at_r: Also compute ``"map@r"``.

    Returns:
        ``{"top1": ..., "top5": ..., "map": ..., "map@r": ...}`` as python floats in [0, 1]. A query without any
        relevant gallery item counts as a CMC miss and is left out of the mAP and mAP@R averages; if no query
        has a relevant item, ``map`` (and ``map@r``) is 0.0.

    Raises:
        ValueError: On mismatched or empty shapes, non-finite values, non-integer labels or unknown options.
        ImportError: ``backend="faiss"`` without FAISS installed.
    """
    ks = _check_options(distance, backend, ks, chunk_size)
    per_query = evaluate_queries(query, query_labels, gallery, gallery_labels, exclude_self=exclude_self,
                                 distance=distance, backend=backend, chunk_size=chunk_size)
    return summarize(per_query, ks, map_at_r)


def evaluate_queries(query: Tensor | np.ndarray, query_labels: Tensor | np.ndarray, gallery: Tensor | np.ndarray,
                     gallery_labels: Tensor | np.ndarray, *, exclude_self: bool, distance: str = "l2",
                     backend: str = "auto", chunk_size: int | None = None) -> QueryMetrics:
    """:func:`evaluate` per query, before averaging: :class:`~fct_lightning.retrieval.metrics.QueryMetrics` ``[Q]``
    (``summarize`` of it is what :func:`evaluate` returns; ``first_rank == 1`` marks the queries whose top-1 is
    right, which negative flips compare across models)."""
    _check_options(distance, backend, (1,), chunk_size)
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery")
    check_pair(q, g)
    ql = _as_labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    gl = _as_labels(gallery_labels, "gallery_labels", g.shape[0], "gallery", g.device)
    _check_self(exclude_self, q, g)
    q, g = prepare(q, distance), prepare(g, distance)
    chunk = chunk_size or auto_chunk_size(g.shape[0], q.device)
    log.debug("evaluate: Q=%d G=%d d=%d backend=%s chunk=%d distance=%s", q.shape[0], g.shape[0], q.shape[1],
              backend, chunk, distance)
    classes = build_class_index(gl)
    dist = _distances_to(g, backend)
    parts = []
    for s in range(0, q.shape[0], chunk):
        qc = q[s:s + chunk]
        block = dist(qc)
        self_index = torch.arange(s, s + qc.shape[0], device=q.device) if exclude_self else None
        parts.append(query_metrics(block, ql[s:s + chunk], classes, self_index))
        del block
        if g.shape[0] >= _TRIM_MIN_GALLERY:
            _release_heap(q.device)
    return concat_metrics(parts)


def evaluate_mixtures(query: Tensor | np.ndarray, query_labels: Tensor | np.ndarray, gallery_a: Tensor | np.ndarray,
                      gallery_b: Tensor | np.ndarray, gallery_labels: Tensor | np.ndarray,
                      masks: Tensor | np.ndarray, *, exclude_self: bool, distance: str = "l2",
                      ks: Sequence[int] = (1, 5), backend: str = "auto", chunk_size: int | None = None,
                      map_at_r: bool = True,
                      per_query: bool = False) -> list[dict[str, float]] | tuple[list[dict[str, float]], QueryMetrics]:
    """:func:`evaluate` against many galleries that each mix two embeddings of the same items.

    Gallery ``s`` holds ``gallery_b[i]`` where ``masks[s, i]`` is True and ``gallery_a[i]`` elsewhere: the states
    of a partially backfilled gallery (a = transformed, b = re-embedded). A pair's canonical distance does not
    depend on the rest of the gallery, so each block of query distances to ``a`` and to ``b`` is computed once
    and only the ranking is redone per gallery. Result ``s`` is exactly ``evaluate`` of the mixed gallery ``s``.

    Args:
        query: Query embeddings ``[Q, d]``.
        query_labels: Integer labels ``[Q]``.
        gallery_a: Embeddings ``[G, d]`` used where a mask is False.
        gallery_b: Embeddings ``[G, d]`` of the same items, used where a mask is True.
        gallery_labels: Integer labels ``[G]`` (the same items in both galleries).
        masks: Boolean ``[S, G]``, one row per gallery to evaluate.
        exclude_self: As in :func:`evaluate`.
        distance: As in :func:`evaluate`.
        ks: As in :func:`evaluate`.
        backend: As in :func:`evaluate`.
        chunk_size: Queries per block; None picks it from the memory budget.
        map_at_r: As in :func:`evaluate`.
        per_query: Also return the per-query results of every gallery (:class:`QueryMetrics` of ``[S, Q]`` tensors).

    Returns:
        One metrics dict per row of ``masks``, as :func:`evaluate` returns them (and, with ``per_query``, the
        per-query results).
    """
    ks = _check_options(distance, backend, ks, chunk_size)
    q = as_embeddings(query, "query")
    ga, gb = as_embeddings(gallery_a, "gallery_a"), as_embeddings(gallery_b, "gallery_b")
    check_pair(q, ga)
    if ga.shape != gb.shape or ga.device != gb.device:
        raise ValueError(f"gallery_a {tuple(ga.shape)} on {ga.device} and gallery_b {tuple(gb.shape)} on "
                         f"{gb.device} must describe the same items: same shape [G, d], same device.")
    ql = _as_labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    gl = _as_labels(gallery_labels, "gallery_labels", ga.shape[0], "gallery_a", ga.device)
    m = masks if isinstance(masks, Tensor) else torch.as_tensor(np.asarray(masks))
    if m.dtype != torch.bool or m.ndim != 2 or m.shape[1] != ga.shape[0]:
        raise ValueError(f"masks must be a boolean [S, G={ga.shape[0]}] array (True = take gallery_b), got "
                         f"{m.dtype} {tuple(m.shape)}.")
    m = m.to(q.device)
    _check_self(exclude_self, q, ga)
    q, ga, gb = prepare(q, distance), prepare(ga, distance), prepare(gb, distance)
    chunk = chunk_size or auto_chunk_size(ga.shape[0], q.device, bytes_per_pair=_MIX_BYTES_PER_PAIR)
    classes = build_class_index(gl)
    dist_a, dist_b = _distances_to(ga, backend), _distances_to(gb, backend)
    # per-query results of every state, allocated once: thousands of small per-chunk tensors left between the
    # big temporaries fragment the heap (measured: peak RSS 2.4 GB instead of 0.9 GB for 102 states at G = 10k)
    num_q, dev = q.shape[0], q.device
    results = QueryMetrics(*(torch.empty(m.shape[0], num_q, dtype=dt, device=dev)
                             for dt in (torch.int64, torch.float64, torch.float64, torch.int64)))
    for s in range(0, num_q, chunk):
        qc = q[s:s + chunk]
        self_index = torch.arange(s, s + qc.shape[0], device=dev) if exclude_self else None
        keys_a = ranking_keys(dist_a(qc), self_index)
        keys_b = ranking_keys(dist_b(qc), self_index)
        mixed = torch.empty_like(keys_a)  # one scratch buffer: a fresh [c, G] tensor per state costs page faults
        for j, row in enumerate(m):
            torch.where(row, keys_b, keys_a, out=mixed)
            for out, value in zip(results, key_metrics(mixed, ql[s:s + chunk], classes, self_index), strict=True):
                out[j, s:s + chunk] = value
        del keys_a, keys_b, mixed
        if ga.shape[0] >= _TRIM_MIN_GALLERY:
            _release_heap(dev)
    summaries = [summarize(QueryMetrics(*(t[j] for t in results)), ks, map_at_r) for j in range(m.shape[0])]
    return (summaries, results) if per_query else summaries
