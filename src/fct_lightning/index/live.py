"""A live FAISS index over a store whose gallery is being backfilled (``fct-backfill --store`` rounds).

The index's ids are the store's global rows (as :func:`~fct_lightning.index.build_index` builds it). After a round,
:func:`update_index` replaces that round's rows in place: ``remove_ids`` then ``add_with_ids`` (``IndexIDMap2``, or
IVF with a direct map). An on-disk index takes no adds (FAISS issues #1258, #2109): keep a small delta index of the
backfilled rows and merge the two at search time (:func:`search_with_delta`), rebuilding the main index now and
then. Which round wrote a row is the space's ``source`` column (:func:`~fct_lightning.store.read_source`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fct_lightning.index.build import faiss_module, ivf_of
from fct_lightning.store import SOURCE, Store, StoreError, open_store, read_source


def rows_of_rounds(store: Store, space: str, rounds: list[int] | None = None) -> np.ndarray:
    """The rows (sorted, int64) that backfill ``rounds`` wrote in ``space`` (default: the space's own round)."""
    info = store.space(space)
    if SOURCE not in info.columns:
        raise StoreError(f"space {space!r} of {store.path} is not a backfilled space (it has no {SOURCE!r} column)")
    rounds = [int(info.provenance["round"])] if rounds is None else list(rounds)
    return np.flatnonzero(np.isin(read_source(store, space), rounds)).astype(np.int64)


def update_index(index: Any, store: str | Path | Store, space: str, rounds: list[int] | None = None) -> int:
    """Replace, in a live FAISS ``index`` whose ids are the store's global rows, the vectors of the rows backfill
    ``rounds`` wrote (default: the space's own round) by their new-model embeddings from ``space``:
    ``remove_ids`` then ``add_with_ids``. The index must support both (``IndexIDMap2``, or IVF with
    ``make_direct_map`` / ``IDMap2`` around it). Returns the number of rows replaced; a row missing from the index
    is an error (it was not built on this store's rows)."""
    st = store if isinstance(store, Store) else open_store(store)
    rows = rows_of_rounds(st, space, rounds)
    if not len(rows):
        return 0
    vectors = np.concatenate([np.asarray(st.array(space, i)[rows[(rows >= s.start) & (rows < s.stop)] - s.start],
                                         np.float32) for i, s in enumerate(st.shards)])
    removed = index.remove_ids(rows)
    if removed != len(rows):
        raise ValueError(f"the index held {removed} of the {len(rows)} backfilled rows; it must be built with the "
                         f"store's global rows as ids (add_with_ids), on space {st.space(space).provenance['input']!r}")
    index.add_with_ids(np.ascontiguousarray(vectors), rows)
    return len(rows)


def search_with_delta(main: Any, delta: Any, replaced: np.ndarray, queries: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search an index that takes no adds (e.g. an on-disk IVF) together with a small ``delta`` index of the rows
    backfilling replaced (ids = global rows, vectors from the backfilled space): the main index's hits on
    ``replaced`` rows are dropped (an ID selector), and the two result lists merged by distance.

    Returns ``(distances [Q, k], ids [Q, k])`` as ``index.search`` does (smallest first for L2, largest for inner
    product; -1 where fewer than ``k`` exist).
    """
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, np.float32)
    keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(replaced, np.int64)))
    ivf = ivf_of(main)
    params = (faiss.SearchParameters(sel=keep) if ivf is None
              else faiss.SearchParametersIVF(sel=keep, nprobe=ivf.nprobe))
    d1, i1 = main.search(queries, k, params=params)
    d2, i2 = delta.search(queries, k)
    dist, ids = np.concatenate([d1, d2], axis=1), np.concatenate([i1, i2], axis=1)
    ascending = main.metric_type == faiss.METRIC_L2
    order = np.argsort(dist if ascending else -dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


__all__ = ["rows_of_rounds", "search_with_delta", "update_index"]
