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

from .metrics import build_class_index, concat_metrics, query_metrics, summarize
from .search import (
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


def auto_chunk_size(num_gallery: int, device: torch.device, budget_bytes: int | None = None) -> int:
    """Queries per block so the working memory stays near ``budget_bytes`` (256 MiB on CPU, 1 GiB on CUDA)."""
    budget = budget_bytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    return max(1, budget // (_BYTES_PER_PAIR * num_gallery))


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
    check_choice(distance, "distance", DISTANCES)
    check_choice(backend, "backend", BACKENDS)
    ks = _check_ks(ks)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None.")
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery")
    check_pair(q, g)
    ql = _as_labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    gl = _as_labels(gallery_labels, "gallery_labels", g.shape[0], "gallery", g.device)
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(f"exclude_self=True needs len(query) == len(gallery) (item i is both), got "
                         f"{q.shape[0]} and {g.shape[0]}; pass exclude_self=False for separate sets.")
    engine = "faiss" if backend == "faiss" else "torch"
    if engine == "faiss":
        faiss_module()
    q, g = prepare(q, distance), prepare(g, distance)
    chunk = chunk_size or auto_chunk_size(g.shape[0], q.device)
    log.debug("evaluate: Q=%d G=%d d=%d backend=%s chunk=%d distance=%s", q.shape[0], g.shape[0], q.shape[1],
              engine, chunk, distance)
    classes = build_class_index(gl)
    g64 = g.to(torch.float64) if engine == "torch" else None  # cast once, not per chunk
    gn = squared_norms(g) if engine == "torch" else None
    parts = []
    for s in range(0, q.shape[0], chunk):
        qc = q[s:s + chunk]
        block = canonical_distances(qc, g64, gn) if engine == "torch" else faiss_distance_block(qc, g)
        self_index = torch.arange(s, s + qc.shape[0], device=q.device) if exclude_self else None
        parts.append(query_metrics(block, ql[s:s + chunk], classes, self_index))
        del block
        if g.shape[0] >= _TRIM_MIN_GALLERY:
            _release_heap(q.device)
    return summarize(concat_metrics(parts), ks, map_at_r)
