"""Searching an index built by :func:`fct_lightning.index.build_index`: in memory (:func:`search_arrays`, for
callers holding arrays) or from a store of queries to a parquet file of hits (:func:`search`).

Hits (``hits.parquet``): one row per hit, queries in their store's order and hits nearest first::

    query_id  string   the query's id (its store's meta ``id``)
    rank      int32    0 for the nearest hit, 1 for the next, ...
    id        string   the gallery item's id (the indexed store's meta ``id``; FAISS ids are its row numbers)
    distance  float32  squared L2 distance (metric l2; smaller is nearer) or inner product (ip; larger is nearer)

A query gets fewer than ``k`` rows when FAISS finds fewer (an IVF index probing lists that hold fewer than ``k``
items): FAISS's ``-1`` ids are dropped, never written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_lightning.index.build import to_gpu
from fct_lightning.index.files import check_store, load_index, use_gpu
from fct_lightning.retrieval.ann import parse_search_parameters, set_nprobe, set_search_parameters
from fct_lightning.store import Store, open_store

log = logging.getLogger(__name__)
BATCH = 16384
GPU_MAX_K = 2048
"""The largest k (and nprobe) FAISS's GPU indexes search with; larger ones run on the CPU."""
HITS_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()),
                         ("distance", pa.float32())])


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} {value!r} must be a positive integer")
    return int(value)


def search_arrays(index: Any, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest indexed rows of every query.

    Args:
        index: a FAISS index (CPU or GPU), e.g. from :func:`fct_lightning.index.load_index`.
        queries: ``[n, d]`` floats (converted to float32), ``d`` the index's dim.
        k: hits per query.
        nprobe: IVF lists to probe (set on ``index``, and kept); None leaves the index's setting.

    Returns:
        ``(distances [n, k] float32, ids [n, k] int64)``, nearest first; ids are the index's ids (for an index
        of a store, its global row numbers), ``-1`` where fewer than ``k`` were found.
    """
    k = _positive(k, "k")
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"queries of shape {list(x.shape)} do not fit an index of {index.d}-d rows; give [n, "
                         f"{index.d}] rows from the model whose space was indexed")
    if nprobe is not None:
        set_nprobe(index, nprobe)
    distances, ids = index.search(x, k)
    return distances.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


class RowIds:
    """The string ids of a store's global row numbers, read from its meta shards (at most ``cache`` held)."""

    def __init__(self, store: Store, cache: int = 8) -> None:
        self.store, self.cache = store, cache
        self._starts = np.array([s.start for s in store.shards], dtype=np.int64)
        self._ids: OrderedDict[int, pa.Array] = OrderedDict()

    def _shard(self, i: int) -> pa.Array:
        if i in self._ids:
            self._ids.move_to_end(i)
        else:
            self._ids[i] = self.store.meta(i, ["id"]).column("id").combine_chunks()
            if len(self._ids) > self.cache:
                self._ids.popitem(last=False)
        return self._ids[i]

    def __call__(self, rows: np.ndarray) -> pa.Array:
        """The ids of ``rows`` (int64 row numbers of the store), in the same order."""
        if len(rows) and (rows.min() < 0 or rows.max() >= self.store.rows):
            raise ValueError(f"the index returned row {int(rows.max())} for a store of {self.store.rows} rows: it "
                             "does not belong to this store; rebuild it with fct-index")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(shard, kind="stable")
        pieces = []
        for i in np.unique(shard):
            sel = order[shard[order] == i]
            pieces.append(self._shard(int(i)).take(pa.array(rows[sel] - self._starts[i])))
        if not pieces:
            return pa.array([], type=pa.string())
        return pa.concat_arrays(pieces).take(pa.array(np.argsort(order, kind="stable")))


def search(index_path: str | Path, store: Store | str | Path, queries_store: Store | str | Path, query_space: str,
           k: int, out: str | Path, nprobe: int | None = None, batch: int = BATCH, device: str = "auto",
           overwrite: bool = False, search_params: str | None = None) -> dict[str, Any]:
    """Search the index at ``index_path`` with every row of ``queries_store``'s ``query_space``; write the hits.

    Args:
        index_path: the index folder (fct-index ``--out``).
        store: the gallery store the index was built on; refused when its space is another version.
        queries_store: the store of the queries (may be ``store`` itself).
        query_space: the queries' space; its dim must be the index's.
        k: hits per query.
        out: the hits parquet file (see the module docstring); written atomically.
        nprobe: IVF lists to probe (default: the index's own, FAISS's 1).
        batch: queries searched at a time.
        device: ``auto`` (the GPU when FAISS has one and the index is in memory), ``cpu`` or ``cuda``.
        overwrite: replace an existing ``out``.
        search_params: more FAISS search-time parameters, ``"efSearch=128"`` (HNSW), ... (set after the index
            moved to the GPU, where it does).

    Returns:
        ``{"queries", "hits", "seconds", "out"}``.
    """
    started = time.perf_counter()
    k, batch, out = _positive(k, "k"), _positive(batch, "batch"), Path(out)
    if search_params is not None:
        parse_search_parameters(search_params)  # a typo is an error before the index is read
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    store = store if isinstance(store, Store) else open_store(store)
    queries = queries_store if isinstance(queries_store, Store) else open_store(queries_store)
    index, record = load_index(index_path)
    check_store(record, store, index_path)
    qdim = queries.space(query_space).dim
    if qdim != record["dim"]:
        raise ValueError(f"the queries (space {query_space!r} of {queries.path}) are {qdim}-d but the index "
                         f"{index_path} holds {record['dim']}-d rows of space {record['space']!r}; embed the "
                         "queries with the model of the indexed space")
    if nprobe is not None:
        set_nprobe(index, nprobe)
    if use_gpu(device) and not record.get("ondisk") and k <= GPU_MAX_K and (nprobe or 0) <= GPU_MAX_K:
        index = to_gpu(index) or index
    if search_params:
        set_search_parameters(index, search_params)
    ids, written = RowIds(store), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, HITS_SCHEMA) as writer:
            for i in range(len(queries.shards)):
                qids = queries.meta(i, ["id"]).column("id").combine_chunks()
                for _, offset, block in queries.iter_rows(query_space, batch, [i]):
                    distances, rows = search_arrays(index, block, k)
                    found = (rows >= 0).ravel()
                    query = np.repeat(np.arange(offset, offset + len(block)), k)[found]
                    table = pa.table({"query_id": qids.take(pa.array(query)),
                                      "rank": np.tile(np.arange(k, dtype=np.int32), len(block))[found],
                                      "id": ids(rows.ravel()[found]), "distance": distances.ravel()[found]},
                                     schema=HITS_SCHEMA)
                    writer.write_table(table)
                    written += table.num_rows
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    log.info("searched %d queries, %d hits in %.1f s: %s", queries.rows, written, seconds, out)
    return {"queries": queries.rows, "hits": written, "seconds": round(seconds, 3), "out": str(out)}
