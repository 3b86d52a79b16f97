"""Retrieval metrics from distances and labels: CMC top-k, mAP over the full ranking, mAP@R.

Conventions (shared by every function here):

* The ranking of the gallery for a query is by ``(distance, gallery index)``: equal distances rank the lower
  gallery index first.
* A gallery item is *relevant* to a query when it has the query's label. ``R`` is the number of relevant gallery
  items for that query (after removing the query itself when ``self_index`` is given).
* Average precision: ``AP = (1/R) sum_{relevant i} P(rank_i)`` with ``P(n)`` the precision of the first ``n``
  results. mAP@R (Musgrave et al., 2020): ``(1/R) sum_{n <= R} P(n) rel(n)``.
* A query with ``R = 0`` is a miss for CMC and is left out of the mAP and mAP@R averages; if no query has a
  relevant item, mAP and mAP@R are 0.0.

Kernel: each distance is packed with its gallery index into a unique int64 key (see
:func:`~fct_lightning.retrieval.neighbors.ordering_keys`), each row of keys is sorted (values only, numpy SIMD sort on
CPU), and the rank of every relevant item is its key's insertion point, found by binary search. No argsort, no
[c, G] relevance or precision matrices, and ties are exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .neighbors import ordering_keys

_LAST = torch.iinfo(torch.int64).max  # key that ranks after every real item


class ClassIndex(NamedTuple):
    """Gallery items grouped by label.

    Attributes:
        classes: Sorted distinct gallery labels ``[C]``.
        members: Gallery indices sorted by ``(label, index)`` ``[G]``.
        start: Offset of each class in ``members`` ``[C]``.
        count: Number of gallery items per class ``[C]``.
    """

    classes: Tensor
    members: Tensor
    start: Tensor
    count: Tensor


class QueryMetrics(NamedTuple):
    """Per-query results ``[Q]`` each: 1-based rank of the first relevant item (0 if none), AP, AP@R, R."""

    first_rank: Tensor
    ap: Tensor
    ap_at_r: Tensor
    num_relevant: Tensor


def build_class_index(gallery_labels: Tensor) -> ClassIndex:
    """Group gallery items by label.

    Args:
        gallery_labels: Int64 labels ``[G]``.

    Returns:
        A :class:`ClassIndex` on the labels' device.
    """
    classes, count = torch.unique(gallery_labels, sorted=True, return_counts=True)
    members = torch.sort(gallery_labels, stable=True).indices
    start = torch.cumsum(count, 0) - count
    return ClassIndex(classes, members, start, count)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool per size (created on first use): reusing threads keeps allocator arenas bounded."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fct-sort")
    return _POOLS[workers]


def sort_rows(x: Tensor, inplace: bool = False) -> Tensor:
    """Sort each row of a 2-D tensor ascending (values only); ``inplace`` sorts ``x`` itself (CPU only).

    On CPU this uses numpy's SIMD sort on ``torch.get_num_threads()`` threads, which is several times faster
    than ``torch.sort`` there; on other devices it uses ``torch.sort``.
    """
    if x.device.type != "cpu":
        return torch.sort(x, dim=1).values
    out = x.numpy() if inplace else x.numpy().copy()
    workers = max(1, min(torch.get_num_threads(), out.shape[0]))
    if workers == 1:
        out.sort(axis=1)
    else:
        bounds = np.linspace(0, out.shape[0], workers + 1).astype(int)
        jobs = [_pool(workers).submit(out[a:b].sort, axis=1) for a, b in pairwise(bounds) if b > a]
        for job in jobs:
            job.result()
    return x if inplace else torch.from_numpy(out)


def _dense_ranks(ordered: Tensor, query_labels: Tensor, class_index: ClassIndex, r_max: int) -> Tensor:
    """1-based ranks ``[c, r_max]`` of each query's relevant items, ascending, padded with ``_LAST``, found by
    scanning fully sorted keys ``[c, G]`` once (cheaper than a binary search per item when there are many)."""
    c, num_g = ordered.shape
    label_of = torch.empty_like(class_index.members)
    label_of[class_index.members] = torch.repeat_interleave(class_index.classes, class_index.count)
    rel = label_of[(ordered & 0xFFFFFFFF).clamp_(max=num_g - 1)] == query_labels.unsqueeze(1)
    rel &= ordered != _LAST  # the query itself (self_index) is not relevant to itself
    rows, cols = rel.nonzero(as_tuple=True)  # row-major: ascending columns (ranks) within each row
    del rel
    per_row = torch.bincount(rows, minlength=c)
    within = torch.arange(rows.numel(), device=ordered.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    rank = torch.full((c, r_max), _LAST, dtype=torch.int64, device=ordered.device)
    rank[rows, within] = cols + 1
    return rank


def _metrics_from_ranks(rank: Tensor, num_rel: Tensor) -> QueryMetrics:
    """Per-query metrics from the ascending 1-based ranks ``[c, r_max]`` of the relevant items (padding after the
    ``num_rel`` real ones)."""
    ar = torch.arange(rank.shape[1], device=rank.device)
    live = ar < num_rel.unsqueeze(1)
    precision = (ar + 1).to(torch.float64) / rank.to(torch.float64)
    denom = num_rel.clamp(min=1).to(torch.float64)
    ap = (precision * live).sum(1) / denom
    ap_at_r = (precision * (live & (rank <= num_rel.unsqueeze(1)))).sum(1) / denom
    first = torch.where(num_rel > 0, rank[:, 0], 0)
    return QueryMetrics(first, ap, ap_at_r, num_rel)


def ranking_keys(distances: Tensor, self_index: Tensor | None = None) -> Tensor:
    """Unique int64 ranking keys ``[c, G]`` of a distance block; each query's own item (if given) ranks last.

    Args:
        distances: Non-negative float32 ``[c, G]`` (lower is closer), not modified.
        self_index: Optional int64 ``[c]``: the gallery index of each query itself.

    Returns:
        A new int64 tensor ``[c, G]`` (see :func:`~fct_lightning.retrieval.neighbors.ordering_keys`).
    """
    keys = ordering_keys(distances, torch.arange(distances.shape[1], device=distances.device))
    if self_index is not None:
        keys[torch.arange(keys.shape[0], device=keys.device), self_index] = _LAST
    return keys


def query_metrics(distances: Tensor, query_labels: Tensor, class_index: ClassIndex,
                  self_index: Tensor | None = None, dense: bool | None = None) -> QueryMetrics:
    """Per-query CMC rank, AP and AP@R from a block of query-to-gallery distances.

    Args:
        distances: Non-negative float32 ``[c, G]`` (lower is closer), not modified.
        query_labels: Int64 ``[c]`` labels of the queries.
        class_index: :func:`build_class_index` of the gallery labels.
        self_index: Optional int64 ``[c]``: the gallery index of each query itself, removed from its ranking.
        dense: Scan the whole sorted ranking (True) or binary-search each relevant item (False); None picks
            dense when relevant items are more than half of the gallery. Both give the same numbers.

    Returns:
        :class:`QueryMetrics` with tensors ``[c]``.
    """
    return key_metrics(ranking_keys(distances, self_index), query_labels, class_index, self_index, dense)


def key_metrics(keys: Tensor, query_labels: Tensor, class_index: ClassIndex, self_index: Tensor | None = None,
                dense: bool | None = None) -> QueryMetrics:
    """:func:`query_metrics` from :func:`ranking_keys` instead of distances; ``keys`` is used as scratch space.

    ``self_index`` must be the one the keys were made with: it also removes the query from its relevant items.
    """
    c, num_g = keys.shape
    dev = keys.device
    pos = torch.searchsorted(class_index.classes, query_labels).clamp_(max=class_index.classes.numel() - 1)
    present = class_index.classes[pos] == query_labels
    total = torch.where(present, class_index.count[pos], 0)
    r_max = int(total.max()) if c else 0
    if r_max == 0:
        zero = torch.zeros(c, dtype=torch.float64, device=dev)
        return QueryMetrics(torch.zeros(c, dtype=torch.int64, device=dev), zero, zero.clone(), total)
    ar = torch.arange(r_max, device=dev)
    slot = (class_index.start[pos].unsqueeze(1) + ar).clamp_(max=num_g - 1)
    cols = class_index.members[slot]  # [c, r_max] gallery indices of same-label items (padded)
    valid = ar < total.unsqueeze(1)
    if self_index is not None:
        valid &= cols != self_index.unsqueeze(1)
    num_rel = valid.sum(1)
    if dense is None:
        dense = r_max * 2 > num_g  # measured on a 2-core CPU: the binary search is as fast or faster below
    if dense:  # many relevant items: scan the sorted row once instead of one binary search per relevant item
        return _metrics_from_ranks(_dense_ranks(sort_rows(keys, inplace=True), query_labels, class_index, r_max),
                                   num_rel)
    targets = keys.gather(1, cols).masked_fill_(~valid, _LAST)
    # sorting the relevant keys first makes their ranks come out ascending (padding last); numpy's SIMD sort
    # of these [c, R] keys is several times faster than torch.sort of the ranks afterwards
    targets = sort_rows(targets, inplace=True)
    ordered = sort_rows(keys, inplace=True)
    # keys are unique, so the insertion point of a relevant item's key is the number of items ranked before it
    return _metrics_from_ranks(torch.searchsorted(ordered, targets, side="left") + 1, num_rel)


def concat_metrics(parts: Sequence[QueryMetrics]) -> QueryMetrics:
    """Concatenate per-chunk :class:`QueryMetrics` along the query axis."""
    return QueryMetrics(*(torch.cat([getattr(p, f) for p in parts]) for f in QueryMetrics._fields))


def summarize(metrics: QueryMetrics, ks: Sequence[int] = (1, 5), map_at_r: bool = True) -> dict[str, float]:
    """Average per-query results into ``{"top{k}": ..., "map": ..., "map@r": ...}`` (python floats in [0, 1]).

    ``top{k}`` averages over all queries (no relevant item = miss); ``map`` and ``map@r`` over queries with
    ``R > 0``, and are 0.0 when there is none.
    """
    metrics = QueryMetrics(*(t.cpu() for t in metrics))  # reduce on CPU: same order on every device
    has = metrics.num_relevant > 0
    n_q = max(1, metrics.first_rank.numel())
    out = {f"top{k}": float(((metrics.first_rank >= 1) & (metrics.first_rank <= k)).sum()) / n_q for k in ks}
    n_rel = int(has.sum())
    out["map"] = float(metrics.ap[has].sum()) / n_rel if n_rel else 0.0
    if map_at_r:
        out["map@r"] = float(metrics.ap_at_r[has].sum()) / n_rel if n_rel else 0.0
    return out
