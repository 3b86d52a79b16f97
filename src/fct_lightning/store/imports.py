"""Bringing existing arrays into a store: ``.npy`` galleries (also this project's older single-file format, an
``x.npy`` described by ``x.json`` with ``x.ids.txt`` or ``x.labels.npy``) and parquet files with a list column.

Arrays are read shard by shard (``.npy`` memory-mapped, parquet in batches), so memory stays bounded by one
shard whatever the number of rows.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_lightning.store.create import create_store
from fct_lightning.store.format import DEFAULT_SHARD_ROWS, SpaceSpec, StoreError, check_space_name
from fct_lightning.store.store import Store
from fct_lightning.store.write import write_space

log = logging.getLogger(__name__)
Describe = Callable[[Path, int], dict[str, Any] | None]
BATCH = 65536


@dataclass
class ArraySource:
    """A stored ``[rows, dim]`` float array: ``FILE.npy`` or ``FILE.parquet:COLUMN`` (a list-of-floats column).

    Attributes:
        legacy: the description ``FILE.json`` of this project's older format, when there is one.
    """

    path: Path
    column: str | None = None
    rows: int = 0
    dim: int = 0
    dtype: str = "float32"
    legacy: dict[str, Any] | None = None
    _data: Any = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str | Path, describe: Describe | None = None) -> ArraySource:
        """The source named ``text`` (``x.npy`` or ``x.parquet:column``), opened and checked; ``describe`` reads
        the description an ``x.npy`` may come with (see :func:`import_arrays`)."""
        name, sep, column = str(text).rpartition(":")
        if sep and name.endswith(".parquet"):
            return cls(Path(name), column)._open_parquet()
        return cls(Path(text))._open_npy(describe)

    def _open_npy(self, describe: Describe | None) -> ArraySource:
        if self.path.suffix != ".npy":
            raise StoreError(f"{self.path}: give a .npy array file or FILE.parquet:COLUMN")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; give an [N, d] float .npy file")
        try:
            self._data = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise StoreError(f"{self.path} cannot be read as a .npy array ({err}); save an [N, d] float array "
                             "with np.save") from err
        if self._data.ndim != 2 or not np.issubdtype(self._data.dtype, np.floating) or 0 in self._data.shape:
            raise StoreError(f"{self.path} holds a {self._data.dtype} array of shape {list(self._data.shape)}; an "
                             "[N, d] float array (one embedding per row, N, d > 0) is needed")
        self.rows, self.dim = map(int, self._data.shape)
        self.dtype = self._data.dtype.name if self._data.dtype.name in ("float16", "float32") else "float32"
        self.legacy = describe(self.path, self.rows) if describe is not None else None
        for kind, suffix in (("ids", ".ids.txt"), ("labels", ".labels.npy")):
            if (self.legacy or {}).get(kind) and not self.path.with_suffix(suffix).is_file():
                raise StoreError(f"{self.path.with_suffix(suffix)} is missing ({self.path.with_suffix('.json')} "
                                 "lists it); restore it")
        return self

    def _open_parquet(self) -> ArraySource:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; give FILE.parquet:COLUMN")
        try:
            self._data = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{self.path} cannot be read as a parquet file ({err})") from err
        schema = self._data.schema_arrow
        if self.column not in schema.names:
            raise StoreError(f"{self.path} has no column {self.column!r} (it has {schema.names}); give "
                             f"{self.path}:COLUMN with the embeddings' column")
        kind = schema.field(self.column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
                or not pa.types.is_floating(kind.value_type):
            raise StoreError(f"column {self.column!r} of {self.path} is {kind}; a list of floats per row is needed")
        self.rows = self._data.metadata.num_rows
        if self.rows == 0:
            raise StoreError(f"{self.path} has no rows")
        self.dtype = "float16" if pa.types.is_float16(kind.value_type) else "float32"
        self.dim = len(self._batches(0, 1)[0])
        return self

    def _batches(self, start: int, stop: int) -> np.ndarray:
        offsets = np.cumsum([0] + [self._data.metadata.row_group(g).num_rows
                                   for g in range(self._data.num_row_groups)])
        groups = [g for g in range(self._data.num_row_groups) if offsets[g] < stop and offsets[g + 1] > start]
        pos, parts = int(offsets[groups[0]]), []
        for batch in self._data.iter_batches(batch_size=BATCH, row_groups=groups, columns=[self.column]):
            a, b = max(start - pos, 0), min(stop - pos, batch.num_rows)
            if a < b:
                parts.append(batch.column(0).slice(a, b - a))
            pos += batch.num_rows
        col = pa.chunked_array(parts).combine_chunks()
        lengths = col.value_lengths().to_numpy(zero_copy_only=False) if not pa.types.is_fixed_size_list(col.type) \
            else np.full(len(col), col.type.list_size)
        bad = np.flatnonzero(lengths != (self.dim or lengths[0])) if col.null_count == 0 else \
            np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
        if len(bad):
            raise StoreError(f"row {start + int(bad[0])} of {self.path}:{self.column} is missing or has another "
                             f"length than the first row ({self.dim or lengths[0]}); every row needs one embedding")
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop - 1`` (a memory-mapped view for ``.npy``)."""
        return self._data[start:stop] if self.column is None else self._batches(start, stop)

    def describe(self) -> str:
        return f"{self.path}:{self.column}" if self.column else str(self.path)


def read_ids(spec: str | Path) -> Iterator[str]:
    """The ids in ``spec``: ``FILE.parquet:COLUMN``, or a text file with one id per line (a ``.jsonl`` or
    ``.ids.txt`` file holds one JSON string per line, as this project's older format wrote them)."""
    name, sep, column = str(spec).rpartition(":")
    if sep and name.endswith(".parquet"):
        for batch in pq.ParquetFile(name).iter_batches(batch_size=BATCH, columns=[column]):
            yield from (str(v) if v is not None else None for v in batch.column(0).to_pylist())
        return
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"the ids file {path} does not exist; give one id per line")
    as_json = path.name.endswith((".jsonl", ".ids.txt"))
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line) if as_json else line.rstrip("\r\n")


def _count(ids: Iterable[str]) -> int:
    return sum(1 for _ in ids)


def _agree(a: Iterable[Any], b: Iterable[Any], what: str, names: tuple[str, str]) -> None:
    for row, (x, y) in enumerate(itertools.zip_longest(a, b)):
        if x != y:
            raise StoreError(f"{names[0]} and {names[1]} give different {what}: row {row} is {x!r} in the first "
                             f"and {y!r} in the second; they must describe the same items in the same order")


def _labels(path: str | Path) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"the labels file {path} does not exist; np.save one integer per item")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise StoreError(f"{path} holds a {arr.dtype} array of shape {list(arr.shape)}; one integer per item needed")
    return arr


def import_arrays(out: str | Path, spaces: Mapping[str, str | Path], ids: str | Path | None = None,
                  labels: str | Path | None = None, shard_rows: int = DEFAULT_SHARD_ROWS, dtype: str | None = None,
                  normalized: Iterable[str] = (), overwrite: bool = False, describe: Describe | None = None) -> Store:
    """Import aligned arrays (one per space) into the store ``out``, creating it (or adding to it); resumable.

    Args:
        out: the store folder.
        spaces: space name -> ``x.npy`` or ``x.parquet:column``; every source has the same rows, in item order.
        ids: the items' ids (a text file, one per line, or ``FILE.parquet:COLUMN``). Default: those of an
            older-format ``x.ids.txt``, else the row numbers ``"0"``, ``"1"``, ...
        labels: a ``.npy`` of one integer per item. Default: an older-format ``x.labels.npy``, else none.
        shard_rows: rows per shard when the store is created.
        dtype: ``float16`` or ``float32`` on disk (default: each source's own, float32 for other floats).
        normalized: the spaces whose rows are L2-normalised (recorded in the manifest).
        overwrite: replace spaces of the same name written by another job.
        describe: ``describe(path, rows) -> dict | None`` reads (and checks) the description of an ``x.npy`` in this
            project's single-file format (``x.json``: ``stage``, ``digest``, ``ids``/``labels`` sidecars); its
            role, checkpoint digest, ids and labels are then taken from it. ``fct-store import`` passes
            :func:`fct_lightning.gallery.files.read_meta`; the store itself knows only its own format.
    """
    if not spaces:
        raise StoreError("give at least one space to import (NAME=FILE.npy or NAME=FILE.parquet:COLUMN)")
    sources = {check_space_name(name): ArraySource.parse(src, describe) for name, src in spaces.items()}
    first = next(iter(sources.values()))
    for src in sources.values():
        if src.rows != first.rows:
            raise StoreError(f"{src.describe()} has {src.rows} rows but {first.describe()} has {first.rows}; the "
                             "arrays of a store describe the same items, one row each")
    unknown = set(normalized) - set(sources)
    if unknown:
        raise StoreError(f"normalized names {sorted(unknown)}, which are not among the spaces {sorted(sources)}")
    legacy = [(s.path.with_suffix(".ids.txt"), s.path.with_suffix(".labels.npy"), s.legacy)
              for s in sources.values() if s.legacy]
    id_files = ([ids] if ids is not None else []) + [i for i, _, m in legacy if m.get("ids")]
    label_files = ([labels] if labels is not None else []) + [lb for _, lb, m in legacy if m.get("labels")]
    for f in id_files:
        if (n := _count(read_ids(f))) != first.rows:
            raise StoreError(f"{f} lists {n} ids but {first.describe()} has {first.rows} rows; give one id per row")
    for f in id_files[1:]:
        _agree(read_ids(id_files[0]), read_ids(f), "ids", (str(id_files[0]), str(f)))
    label_arr = _labels(label_files[0]) if label_files else None
    for f in label_files[1:]:
        other = _labels(f)
        for a in range(0, max(len(other), len(label_arr)), BATCH):
            x, y = label_arr[a:a + BATCH], other[a:a + BATCH]
            if len(x) != len(y) or not np.array_equal(x, y):
                row = a + (int(np.argmax(x != y)) if len(x) == len(y) else min(len(x), len(y)))
                raise StoreError(f"{label_files[0]} and {f} give different labels from row {row} on; they must "
                                 "describe the same items in the same order")
    item_ids = read_ids(id_files[0]) if id_files else (str(k) for k in range(first.rows))
    try:
        store = create_store(out, item_ids, label_arr, shard_rows=shard_rows, provenance={
            "command": "fct-store import", "ids": str(Path(id_files[0]).resolve()) if id_files else "row numbers",
            "labels": str(Path(label_files[0]).resolve()) if label_files else None})
    except StoreError as err:
        if id_files or "other items" not in str(err):
            raise
        raise StoreError(f"{err} (no ids were given, so the row numbers were taken: to add spaces to this store, "
                         "pass --ids with its items' ids)") from err
    for name, src in sources.items():
        meta = src.legacy or {}
        spec = SpaceSpec(role=meta.get("role") or meta.get("stage") or name, dim=src.dim, dtype=dtype or src.dtype,
                         checkpoint_digest=meta.get("digest"), normalized=name in set(normalized),
                         provenance={"command": "fct-store import", "source": str(src.path.resolve()),
                                     "column": src.column, "legacy": {k: meta.get(k) for k in
                                                                      ("checkpoint", "dataset", "space", "source")}
                                     if meta else None})
        write_space(store, name, spec, lambda i, src=src: src.read(store.shards[i].start, store.shards[i].stop),
                    overwrite=overwrite)
    return Store(out)
