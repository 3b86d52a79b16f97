"""FAISS indexes on the spaces of a store, and searching them.

::

    record = build_index("gallery", "fct+side", "IVF4096,PQ32", "gallery.index", train_rows=1_000_000)
    search("gallery.index", "gallery", "queries", "new", k=100, out="hits.parquet", nprobe=32)

    index, record = load_index("gallery.index")          # in memory, e.g. for a callback or fct-eval
    distances, rows = search_arrays(index, queries, k=10, nprobe=32)

An index is a folder (``index.faiss``, ``index.json``, and ``lists.ivfdata`` when on disk; see
:mod:`fct_lightning.index.files`); its FAISS ids are the store's global row numbers, and it refuses a store whose
space is not the version it was built on; :mod:`fct_lightning.index.live` keeps one current while the gallery is
backfilled. Training uses a seeded uniform random sample of the whole store; see
:mod:`fct_lightning.index.build` and :mod:`fct_lightning.index.search`.
"""

from fct_lightning.index.build import (
    build_index,
    default_train_rows,
    ivf_of,
    make_index,
    to_gpu,
    training_rows,
    training_sample,
)
from fct_lightning.index.files import check_store, load_index, read_record
from fct_lightning.index.live import rows_of_rounds, search_with_delta, update_index
from fct_lightning.index.search import HITS_SCHEMA, RowIds, search, search_arrays, set_nprobe

__all__ = [
    "HITS_SCHEMA", "RowIds", "build_index", "check_store", "default_train_rows", "ivf_of", "load_index", "make_index",
    "read_record", "rows_of_rounds", "search", "search_arrays", "search_with_delta", "set_nprobe", "to_gpu",
    "training_rows", "training_sample", "update_index",
]
