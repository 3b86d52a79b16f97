"""The embedding store: one folder per set of items, sharded, checksummed, resumable, readable by the ecosystem.

::

    STORE/manifest.json              format + version, shards (name, rows, meta sha256), total rows, and per
                                     space: role, checkpoint digest, dim, dtype, normalised, per-shard sha256,
                                     provenance
    STORE/meta/part-00000.parquet    one row per item in shard order: id (unique string), label (optional int64)
    STORE/<space>/part-00000.npy     one [rows, dim] float16/float32 array per shard, aligned with the meta shard

``STORE/<space>`` with ``STORE/meta`` is what ``embedding_reader.EmbeddingReader(..., file_format="parquet_npy")``
and autofaiss read, as it is. Nothing is rewritten in place; a space appears in the manifest (replaced
atomically) only once all its shards are written and checked. This package needs only numpy and pyarrow.

Reading::

    store = open_store("gallery")
    for shard, offset, block in store.iter_rows("old", 65536):
        ...

Writing a space, resumably (a killed job run again redoes only unfinished shards), in one process::

    write_space(store, "old", SpaceSpec(role="old", dim=128, dtype="float16"), lambda i: embed(store.ids(i)))

or split across processes (rank ``r`` of ``n``), rows arriving in batches in any order::

    with SpaceWriter(store, "old", spec, shards=store.shards_for(r, n)) as writer:
        for rows, emb in batches_of(writer.pending):   # global row indices and their [b, dim] embeddings
            writer.add(rows, emb)
    # once every rank is done, on any one process:
    finalize_space(store, "old")
"""

from fct_lightning.store.create import create_store, first_difference, same_items
from fct_lightning.store.format import (
    DEFAULT_SHARD_ROWS,
    DTYPES,
    FORMAT,
    SOURCE,
    VERSION,
    Shard,
    Space,
    SpaceSpec,
    StoreError,
    StoreLocked,
    check_space_name,
)
from fct_lightning.store.imports import ArraySource, import_arrays, read_ids
from fct_lightning.store.store import Store, open_store, read_source
from fct_lightning.store.verify import verify_store
from fct_lightning.store.write import SpaceWriter, finalize_space, write_space

__all__ = [
    "DEFAULT_SHARD_ROWS", "DTYPES", "FORMAT", "SOURCE", "VERSION", "ArraySource", "Shard", "Space", "SpaceSpec",
    "SpaceWriter", "Store", "StoreError", "StoreLocked", "check_space_name", "create_store", "finalize_space",
    "first_difference", "import_arrays", "open_store", "read_ids", "read_source", "same_items", "verify_store",
    "write_space",
]
