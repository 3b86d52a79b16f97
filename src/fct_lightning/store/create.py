"""Creating the store of a set of items (:func:`create_store`: its meta shards and a manifest without spaces), and
comparing items (:func:`same_items`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_lightning.store.files import replacing, sha256_file
from fct_lightning.store.format import DEFAULT_SHARD_ROWS, FORMAT, MANIFEST, META, VERSION, StoreError, shard_name
from fct_lightning.store.store import LOCKS, Store, manifest_lock, write_manifest


def _slices(values: Any, name: str, rows: int | None) -> Any:
    if values is not None and rows is not None and len(values) != rows:
        raise StoreError(f"{name} has {len(values)} entries for {rows} ids; give one per item")
    return values


def _tables(ids: Iterable[str], labels: Any, extra: Mapping[str, Any], shard_rows: int) -> Iterator[pa.Table]:
    """The meta shards of the items, as tables of at most ``shard_rows`` rows."""
    it, start = iter(ids), 0
    while chunk := list(itertools.islice(it, shard_rows)):
        cols: dict[str, pa.Array] = {}
        try:
            cols["id"] = pa.array(chunk, type=pa.string())
        except (pa.ArrowException, TypeError) as err:
            raise StoreError(f"the ids of rows {start} to {start + len(chunk) - 1} are not all strings ({err}); "
                             "give one string id per item") from err
        if cols["id"].null_count:
            raise StoreError(f"the id of row {start + cols['id'].is_null().index(True).as_py()} is missing; "
                             "every item needs a string id")
        if labels is not None:
            part = np.asarray(labels[start:start + len(chunk)])
            if len(part) != len(chunk) or not np.issubdtype(part.dtype, np.integer):
                raise StoreError(f"labels must be one integer per item (got {part.dtype} values, {len(part)} for "
                                 f"rows {start} to {start + len(chunk) - 1})")
            cols["label"] = pa.array(part.astype(np.int64))
        for name, values in extra.items():
            cols[name] = pa.array(values[start:start + len(chunk)])
            if len(cols[name]) != len(chunk):
                raise StoreError(f"column {name!r} has fewer entries than there are ids (it ends before row "
                                 f"{start + len(cols[name])})")
        yield pa.table(cols)
        start += len(chunk)


def first_duplicate(hashes: np.ndarray, id_at: Any) -> tuple[int, int] | None:
    """The earliest repeat ``(first row, repeated row)`` among ids whose ``hash()`` values are ``hashes``."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    pairs = sorted((int(order[k + 1]), int(order[k])) for k in same)
    for later, earlier in pairs:
        if id_at(earlier) == id_at(later):
            return earlier, later
    return None


def first_difference(a: pa.Table, b: pa.Table) -> tuple[int, str] | None:
    """The first ``(row, column)`` where two meta tables differ (a missing column counts), or None."""
    for name in dict.fromkeys([*a.column_names, *b.column_names]):
        if name not in a.column_names or name not in b.column_names:
            return 0, name
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        for row, (u, v) in enumerate(zip(x, y, strict=False)):
            if u != v:
                return row, name
        if len(x) != len(y):
            return min(len(x), len(y)), name
    return None


def _check_same(store: Store, tables: Iterator[pa.Table], shard_rows: int) -> Store:
    fix = f"choose another store folder, or delete {store.path} to re-create it"
    if shard_rows != store.shard_rows:
        raise StoreError(f"{store.path} already exists with shard_rows {store.shard_rows}, not {shard_rows}; "
                         f"pass shard_rows {store.shard_rows}, or {fix}")
    i, table = -1, None
    for i, table in enumerate(tables):
        if i >= len(store.shards):
            raise StoreError(f"{store.path} already exists with {store.rows} items, fewer than given; {fix}")
        old = store.meta(i, table.column_names if set(table.column_names) <= set(store.manifest["columns"]) else None)
        if not table.equals(old):
            row, col = first_difference(old, table) or (0, "id")
            here = table.column(col)[row].as_py() if col in table.column_names and row < table.num_rows else None
            there = old.column(col)[row].as_py() if col in old.column_names and row < old.num_rows else None
            raise StoreError(f"{store.path} already exists for other items: row {store.shards[i].start + row} "
                             f"(shard {store.shards[i].name}, row {row}) has {col} {there!r} there and {here!r} "
                             f"here; {fix}")
    if table is None or i + 1 != len(store.shards) or store.shards[i].rows != table.num_rows:
        raise StoreError(f"{store.path} already exists with {store.rows} items, more than given; {fix}")
    return store


def create_store(path: str | Path, ids: Iterable[str], labels: Sequence[int] | np.ndarray | None = None,
                 extra_columns: Mapping[str, Any] | None = None, shard_rows: int = DEFAULT_SHARD_ROWS,
                 provenance: dict[str, Any] | None = None) -> Store:
    """Create the store of a set of items at ``path``: its meta shards and a manifest without spaces.

    Args:
        path: the store folder (created; it must not hold anything else).
        ids: one unique string per item, in store order (a list, or any iterable, consumed shard by shard).
        labels: one integer per item (sliceable: a list, an array or a memory-mapped ``.npy``), or None.
        extra_columns: more meta columns, name -> one value per item (sliceable), stored as given.
        shard_rows: the rows of every shard but the last.
        provenance: free-form JSON-able facts about the items (which command, which inputs).

    Returns:
        The store. When ``path`` already is a store of exactly these items (same shards, same meta), it is
        returned as it is (so a job run again does not redo it); other items are an error naming the first row
        that differs. Duplicate ids are an error naming the first repeat.
    """
    path, extra = Path(path), dict(extra_columns or {})
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise StoreError(f"shard_rows {shard_rows!r} must be a positive integer (rows per shard)")
    for name in extra:
        if name in ("id", "label") or not isinstance(name, str):
            raise StoreError(f"extra column {name!r} is not allowed: 'id' and 'label' have their own arguments")
    rows = len(ids) if isinstance(ids, Sized) else None  # type: ignore[arg-type]
    labels = _slices(labels, "labels", rows)
    for name, values in extra.items():
        _slices(values, f"column {name!r}", rows)
    tables = _tables(ids, labels, extra, shard_rows)
    if (path / MANIFEST).exists():
        return _check_same(Store(path), tables, shard_rows)
    if path.exists() and (not path.is_dir() or any(p.name not in (META, LOCKS) for p in path.iterdir())):
        raise StoreError(f"{path} exists and is not a store; choose a new folder for the store")
    path.mkdir(parents=True, exist_ok=True)
    with manifest_lock(path).acquire():
        if (path / MANIFEST).exists():  # another job finished it meanwhile
            return _check_same(Store(path), tables, shard_rows)
        (path / META).mkdir(exist_ok=True)
        for leftover in (path / META).glob("part-*.parquet"):  # of a creation that did not finish
            leftover.unlink()
        lengths = {f"column {k!r}": len(v) for k, v in extra.items()}
        if labels is not None:
            lengths["labels"] = len(labels)
        return _write_meta(path, tables, shard_rows, lengths, provenance or {})


def _write_meta(path: Path, tables: Iterator[pa.Table], shard_rows: int, lengths: dict[str, int],
                provenance: dict[str, Any]) -> Store:
    shards, hashes, columns, written = [], [], None, []
    try:
        for i, table in enumerate(tables):
            final = path / META / f"{shard_name(i)}.parquet"
            with replacing(final, path / META / f".{shard_name(i)}.tmp") as tmp:
                pq.write_table(table, tmp)
            written.append(final)
            columns = columns or {name: str(t) for name, t in zip(table.column_names, table.schema.types,
                                                                   strict=True)}
            hashes.append(np.fromiter((hash(s) for s in table.column("id").to_pylist()), np.int64, table.num_rows))
            shards.append({"name": shard_name(i), "rows": table.num_rows, "meta_sha256": sha256_file(final)})
        if not shards:
            raise StoreError("no ids were given: a store needs at least one item")
        total = sum(s["rows"] for s in shards)
        for name, n in lengths.items():
            if n != total:
                raise StoreError(f"{name} has {n} entries for {total} ids; give one per item (nothing was kept)")
        ids_of: dict[int, list[str]] = {}

        def id_at(row: int) -> str:
            k = row // shard_rows
            if k not in ids_of:
                ids_of[k] = pq.read_table(written[k], columns=["id"]).column("id").to_pylist()
            return ids_of[k][row % shard_rows]

        dup = first_duplicate(np.concatenate(hashes), id_at)
        if dup is not None:
            raise StoreError(f"id {id_at(dup[0])!r} is given twice, for rows {dup[0]} and {dup[1]} (shards "
                             f"{shard_name(dup[0] // shard_rows)} and {shard_name(dup[1] // shard_rows)}); ids must "
                             "be unique: fix the ids and run again (nothing was kept)")
        manifest = {"format": FORMAT, "version": VERSION, "rows": total,
                    "shard_rows": shard_rows, "shards": shards, "columns": columns, "provenance": provenance,
                    "spaces": {}}
        write_manifest(path, manifest)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    return Store(path)


def same_items(a: Store, b: Store) -> None:
    """Nothing when two stores hold the same items (ids) in the same order; else a StoreError naming the first
    row that differs (as a command that pairs two stores, e.g. a gallery and its transformed copy, reports it)."""
    same_layout = [s.rows for s in a.shards] == [s.rows for s in b.shards]
    if same_layout and all(a.manifest["shards"][i].get("meta_sha256") == b.manifest["shards"][i].get("meta_sha256")
                           for i in range(len(a.shards))):
        return
    ids_a = itertools.chain.from_iterable(a.ids(i) for i in range(len(a.shards)))
    ids_b = itertools.chain.from_iterable(b.ids(i) for i in range(len(b.shards)))
    for row, (x, y) in enumerate(itertools.zip_longest(ids_a, ids_b)):
        if x != y:
            raise StoreError(f"{a.path} and {b.path} hold different items: row {row} is {x!r} in the first and "
                             f"{y!r} in the second (None: past its last row); use two stores of the same items, "
                             "in the same order")
    if not same_layout:
        raise StoreError(f"{a.path} and {b.path} hold the same items in shards of {a.shard_rows} and "
                         f"{b.shard_rows} rows; shards must line up: re-create one with shard_rows "
                         f"{a.shard_rows}")
