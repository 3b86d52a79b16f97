"""Writing a space: shard by shard, resumable, in any number of processes, published last.

Each shard is written to ``STORE/<space>/.progress/part-NNNNN.tmp``, synced and renamed to
``STORE/<space>/part-NNNNN.npy`` (a space with row columns also gets ``STORE/<space>.columns/part-NNNNN.parquet``,
the same way, first); then a record (``.progress/part-NNNNN.json``: rows, dim, dtype, sha256 and the
job's key, a hash of its :class:`SpaceSpec`) says it is complete. A shard is skipped when its record belongs to
this job and the file still has the recorded sha256, so a job killed at any moment and run again redoes only the
rest, and its result is byte-identical to an uninterrupted run. While a process writes a shard it holds that
shard's lock (``.progress/part-NNNNN.lock``): processes writing disjoint shards never wait for each other, two
writing the same shard cannot. :func:`finalize_space` (any process, any number of times) checks every shard and
only then adds the space to the manifest, which is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fct_lightning.store.files import (
    FileLock,
    dump_json,
    npy_size,
    read_json,
    replacing,
    sha256_file,
    write_bytes,
    write_npy,
    write_parquet,
)
from fct_lightning.store.format import COLUMNS_SUFFIX, SpaceSpec, StoreError, check_space_name
from fct_lightning.store.store import MANIFEST_WAIT, Store, manifest_lock, write_manifest

log = logging.getLogger(__name__)
PROGRESS = ".progress"
JOB = "space.json"


def _record(spec: SpaceSpec) -> dict[str, Any]:
    try:
        return json.loads(dump_json(spec.record()))
    except (TypeError, ValueError) as err:
        raise StoreError(f"the space's provenance {spec.provenance!r} cannot be stored as JSON ({err}); give "
                         "strings, numbers, lists and dicts only") from err


def _key(record: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(dump_json(record)).hexdigest()


SHA_KEYS = ("sha256", "columns_sha256")
"""The keys a published space entry adds to its spec's record."""

ARROW_TYPES = {"int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
               "float32": pa.float32(), "float64": pa.float64(), "string": pa.string()}


def column_table(spec: SpaceSpec, values: Any, rows: int, where: str) -> pa.Table:
    """The row columns ``values`` (name -> one value per row) of a shard of ``rows`` rows as the table stored,
    columns by name; a StoreError names a missing, extra, short or ill-typed column."""
    if not isinstance(values, dict) or set(values) != set(spec.columns):
        got = sorted(values) if isinstance(values, dict) else values
        raise StoreError(f"{where} needs the row columns {sorted(spec.columns)} (name -> one value per row); got "
                         f"{got!r}")
    cols = {}
    for name in sorted(spec.columns):
        try:
            cols[name] = pa.array(np.asarray(values[name]) if spec.columns[name] != "string" else values[name],
                                  type=ARROW_TYPES[spec.columns[name]])
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise StoreError(f"row column {name!r} of {where} cannot be stored as {spec.columns[name]} "
                             f"({err})") from err
        if len(cols[name]) != rows or cols[name].null_count:
            raise StoreError(f"row column {name!r} of {where} has {len(cols[name])} values ({cols[name].null_count} "
                             f"missing); give one per row ({rows})")
    return pa.table(cols)


class SpaceWriter:
    """Writes some or all shards of one space, each as a whole array or from row blocks in any order.

    Args:
        store: the store (or its folder).
        space: the space's name, which is its folder name (``old``, ``side_info``, ``fct+side``, ...).
        spec: what the rows are; it is the job's identity: a rerun with an equal spec resumes.
        shards: the shard indices this process writes (default: all). Processes given disjoint sets (e.g.
            ``store.shards_for(rank, world)``) run side by side; then one of them calls :func:`finalize_space`.
        overwrite: replace a space that another job (another spec) published or began. Shards that this very
            job completed are still kept.

    Attributes:
        pending: this writer's shards that still need writing (the others are complete and were checked).
        written: the shards this writer wrote.

    Use it as a context manager: on exit the locks are let go and unfinished shards are dropped (nothing of
    them is kept); a shard that received only part of its rows is an error unless an exception is under way.
    One thread uses a writer at a time. Rows are numpy arrays (``tensor.float().cpu().numpy()``); rows already
    in the stored dtype skip a CPU conversion. Memory: one ``[shard rows, dim]`` buffer per shard being filled.
    """

    def __init__(self, store: Store | str | Path, space: str, spec: SpaceSpec, shards: Sequence[int] | None = None,
                 overwrite: bool = False) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.space, self.spec = check_space_name(space), spec
        self.folder = self.store.path / space
        self.columns_folder = self.store.path / f"{space}{COLUMNS_SUFFIX}"
        self.progress = self.folder / PROGRESS
        self.record = _record(spec)
        self.key = _key(self.record)
        self.shards = sorted({self.store.shard(i).index for i in (range(len(self.store.shards)) if shards is None
                                                                  else shards)})
        self._claim(overwrite)
        self.pending = [i for i in self.shards if not self._scan(i)]
        if len(self.pending) < len(self.shards):
            log.info("space %r of %s: %d of %d shards are complete and checked, %d to write", space,
                     self.store.path, len(self.shards) - len(self.pending), len(self.shards), len(self.pending))
        self.written: list[int] = []
        self._open: dict[int, tuple[FileLock, np.ndarray, np.ndarray]] = {}

    def _claim(self, overwrite: bool) -> None:
        """Check (or, with ``overwrite``, take over) the space in the manifest and in its job record."""
        path, fix = self.store.path, "pass overwrite (--overwrite) to replace it, or choose another space name"
        with manifest_lock(path).acquire(wait=MANIFEST_WAIT):
            fresh = Store(path)
            published = fresh.manifest["spaces"].get(self.space)
            if published is not None and {k: v for k, v in published.items() if k not in SHA_KEYS} != self.record:
                if not overwrite:
                    raise StoreError(f"space {self.space!r} of {path} was made by another job ({_what(published)}, "
                                     f"not {_what(self.record)}); {fix}")
                write_manifest(path, {**fresh.manifest, "spaces": {k: v for k, v in fresh.manifest["spaces"].items()
                                                                   if k != self.space}})
            job = read_json(self.progress / JOB)
            if job != self.record:
                if job is not None and not overwrite and published is None:
                    raise StoreError(f"{self.folder} holds shards of another job that did not finish "
                                     f"({_what(job)}, not {_what(self.record)}); run that job again to finish "
                                     f"it, or {fix}")
                self.progress.mkdir(parents=True, exist_ok=True)
                write_bytes(self.progress / JOB, dump_json(self.record), tmp=self.progress / "space.tmp")

    def _lock(self, i: int) -> FileLock:
        name = self.store.shard(i).name
        return FileLock(self.progress / f"{name}.lock", f"shard {name} of space {self.space!r} in {self.store.path}")

    def complete(self, i: int) -> bool:
        """Whether shard ``i`` is written by this job and its file still has the recorded sha256."""
        shard = self.store.shard(i)
        rec, path = read_json(self.progress / f"{shard.name}.json"), self.folder / f"{shard.name}.npy"
        want = {"shard": shard.name, "rows": shard.rows, "dim": self.spec.dim, "dtype": self.spec.dtype,
                "job": self.key}
        table = self.store.columns_path(self.space, i)
        return (isinstance(rec, dict) and {k: rec.get(k) for k in want} == want and path.is_file()
                and path.stat().st_size == npy_size(shard.rows, self.spec.dim, self.spec.dtype)
                and sha256_file(path) == rec.get("sha256")
                and (not self.spec.columns or (table.is_file() and sha256_file(table) == rec.get("columns_sha256"))))

    def _scan(self, i: int) -> bool:
        with self._lock(i).acquire():  # another job writing it: refused now, not after hours of work
            return self.complete(i)

    def _write_locked(self, i: int, data: np.ndarray, columns: dict[str, Any] | None = None) -> None:
        shard = self.store.shard(i)
        if isinstance(data, tuple) and self.spec.columns:  # write_shard's function gave (array, columns)
            data, columns = data
        data = np.asarray(data)
        if data.ndim != 2 or data.shape != (shard.rows, self.spec.dim) or not np.issubdtype(data.dtype, np.floating):
            raise StoreError(f"shard {shard.name} of space {self.space!r} must be a float [{shard.rows}, "
                             f"{self.spec.dim}] array (its items' rows, dim {self.spec.dim}); got {data.dtype} "
                             f"{list(data.shape)}")
        final = self.folder / f"{shard.name}.npy"

        def describe(row: int) -> str:
            return (f"row {row} of shard {shard.name} of space {self.space!r} (item {self.store.ids(i)[row]!r}, "
                    f"row {shard.start + row} of {self.store.path})")

        extra = {}
        if self.spec.columns:
            table = column_table(self.spec, columns, shard.rows, f"shard {shard.name} of space {self.space!r}")
            self.columns_folder.mkdir(exist_ok=True)
            with replacing(self.store.columns_path(self.space, i), self.progress / f"{shard.name}.columns.tmp") as tmp:
                extra["columns_sha256"] = write_parquet(tmp, table)
        elif columns is not None:
            raise StoreError(f"space {self.space!r} has no row columns (its spec declares none); give only the array")
        with replacing(final, self.progress / f"{shard.name}.tmp") as tmp:
            sha = write_npy(tmp, data, self.spec.dtype, describe)
        rec = {"shard": shard.name, "rows": shard.rows, "dim": self.spec.dim, "dtype": self.spec.dtype,
               "job": self.key, "sha256": sha, **extra}
        write_bytes(self.progress / f"{shard.name}.json", dump_json(rec), tmp=self.progress / f"{shard.name}.rec.tmp")
        self.written.append(i)
        log.info("wrote %s (%d rows)", final, shard.rows)
        if i in self.pending:
            self.pending.remove(i)

    def write_shard(self, i: int, data: np.ndarray | Callable[[], Any], columns: dict[str, Any] | None = None) -> bool:
        """Write shard ``i`` from ``data`` ([rows, dim] floats, or a function returning them, called only if the
        shard still needs writing, under its lock). Returns False when the shard was complete already.

        A space with row columns (``spec.columns``) takes their values too: ``columns`` (name -> one value per
        row), or ``data``'s function returns ``(array, columns)``.
        """
        if i not in self.shards:
            raise StoreError(f"shard {i} is not one of this writer's shards ({_span(self.shards)})")
        with self._lock(i).acquire():
            if self.complete(i):
                if i in self.pending:
                    self.pending.remove(i)
                return False
            self._write_locked(i, data() if callable(data) else data, columns)
        return True

    def add(self, rows: int | np.ndarray, block: np.ndarray) -> list[int]:
        """Add the embeddings ``block`` ([n, dim]) of store rows ``rows`` (global row indices, or the first of
        ``n`` consecutive ones), in any order; a shard is written as soon as all its rows are in.

        Rows of shards that are complete already are dropped. Returns the shards this call wrote.
        """
        if self.spec.columns:
            raise StoreError(f"space {self.space!r} has row columns: write it shard by shard (write_shard, with the "
                             "columns' values), not row blocks")
        block = np.asarray(block)
        idx = np.arange(rows, rows + len(block)) if isinstance(rows, int | np.integer) else np.asarray(rows, np.int64)
        if block.ndim != 2 or block.shape[1] != self.spec.dim or idx.shape != (len(block),):
            raise StoreError(f"add() takes one row index per row of a [n, {self.spec.dim}] block; got "
                             f"{list(block.shape)} rows for {list(idx.shape)} indices")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.store.rows):
            raise StoreError(f"row indices must be between 0 and {self.store.rows - 1} (the store's rows)")
        which, done = idx // self.store.shard_rows, []
        for i in np.unique(which).tolist():
            if i not in self.shards:
                raise StoreError(f"row {int(idx[which == i][0])} is in shard {i}, which this writer does not write "
                                 f"(its shards: {_span(self.shards)})")
            if i in self.pending and self._fill(i, idx[which == i] - self.store.shard(i).start, block[which == i]):
                done.append(i)
        return done

    def _fill(self, i: int, local: np.ndarray, rows: np.ndarray) -> bool:
        shard = self.store.shard(i)
        if i not in self._open:
            lock = self._lock(i).acquire()
            try:
                if self.complete(i):  # another job finished it meanwhile
                    lock.release()
                    self.pending.remove(i)
                    return False
                self._open[i] = (lock, np.empty((shard.rows, self.spec.dim), self.spec.dtype),
                                 np.zeros(shard.rows, bool))
            except BaseException:
                lock.release()
                raise
        lock, data, filled = self._open[i]
        if filled[local].any() or len(np.unique(local)) != len(local):
            row = int(local[filled[local]][0]) if filled[local].any() else int(local[0])
            raise StoreError(f"row {shard.start + row} (item {self.store.ids(i)[row]!r}) was given twice; each "
                             "row must be added once")
        with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow becomes inf: refused when written
            data[local] = rows
        filled[local] = True
        if not filled.all():
            return False
        try:
            self._write_locked(i, data)
        finally:
            del self._open[i]
            lock.release()
        return True

    def close(self, failed: bool = False) -> None:
        """Let go of the locks and drop unfinished shards; a partly filled one is an error unless ``failed``."""
        partial = {i: int(f.sum()) for i, (_, _, f) in self._open.items()}
        for lock, _, _ in self._open.values():
            lock.release()
        self._open.clear()
        if partial and not failed:
            i, got = next(iter(partial.items()))
            raise StoreError(f"shard {self.store.shard(i).name} of space {self.space!r} got {got} of its "
                             f"{self.store.shard(i).rows} rows before the writer was closed, and was not kept; "
                             "add every row of each shard (run the same command again: complete shards are kept)")

    def __enter__(self) -> SpaceWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def _what(record: dict[str, Any]) -> str:
    return (f"role {record.get('role')!r}, checkpoint {record.get('checkpoint_digest')!r}, dim {record.get('dim')}, "
            f"{record.get('dtype')}, provenance {json.dumps(record.get('provenance'), sort_keys=True)}")


def _span(shards: Sequence[int]) -> str:
    return ", ".join(map(str, shards[:8])) + (f" ... ({len(shards)} shards)" if len(shards) > 8 else "")


def write_space(store: Store | str | Path, space: str, spec: SpaceSpec, produce: Callable[[int], np.ndarray],
                shards: Sequence[int] | None = None, overwrite: bool = False) -> list[int]:
    """Write ``space`` shard by shard with ``produce(shard index) -> [rows, dim] floats``; resumable.

    Shards that are complete and verified are skipped (``produce`` is not called for them). With ``shards=None``
    the space is then published (:func:`finalize_space`); with a subset (this process's part) it is not: call
    :func:`finalize_space` once every part is done. See :class:`SpaceWriter` for the other arguments.

    Returns:
        The shards written by this call.
    """
    with SpaceWriter(store, space, spec, shards, overwrite) as writer:
        for i in list(writer.pending):
            writer.write_shard(i, lambda i=i: produce(i))
    if shards is None:
        finalize_space(writer.store, space)
    return writer.written


def finalize_space(store: Store | str | Path, space: str, check_content: bool = True) -> Store:
    """Publish ``space`` in the manifest once every shard is written (by any processes) and checked.

    Idempotent: a space already published as it is leaves the manifest untouched. ``check_content=False`` trusts
    the shards' records and sizes instead of reading every file again.

    Returns:
        The store, opened again (it lists the space).
    """
    path = store.path if isinstance(store, Store) else Path(store)
    store, folder = Store(path), path / check_space_name(space)
    record = read_json(folder / PROGRESS / JOB)
    if not isinstance(record, dict):
        if space in store.spaces:
            return store
        raise StoreError(f"space {space!r} of {path} was never written ({folder / PROGRESS / JOB} is missing); "
                         "write it first (fct-store import, fct-embed or fct-transform)")
    key, problems, sha, col_sha = _key(record), [], [], []
    has_columns = bool(record.get("columns"))
    for shard in store.shards:
        rec, file = read_json(folder / PROGRESS / f"{shard.name}.json"), folder / f"{shard.name}.npy"
        columns = store.columns_path(space, shard.index)
        if not isinstance(rec, dict) or rec.get("job") != key or rec.get("rows") != shard.rows:
            problems.append(f"shard {shard.name} is not written yet")
        elif not file.is_file() or file.stat().st_size != npy_size(shard.rows, record["dim"], record["dtype"]):
            problems.append(f"{file} is missing or has the wrong size")
        elif check_content and sha256_file(file) != rec["sha256"]:
            problems.append(f"{file} does not match its recorded sha256 (changed after it was written)")
        elif has_columns and (not columns.is_file() or (check_content
                                                        and sha256_file(columns) != rec.get("columns_sha256"))):
            problems.append(f"{columns} is missing or does not match its recorded sha256")
        sha.append(rec.get("sha256") if isinstance(rec, dict) else None)
        col_sha.append(rec.get("columns_sha256") if isinstance(rec, dict) else None)
    names = {f"{s.name}.npy" for s in store.shards}
    problems += [f"{p} does not belong in the space folder (remove it: readers such as embedding-reader would read "
                 "it)" for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.name not in names]
    if has_columns and (path / f"{space}{COLUMNS_SUFFIX}").is_dir():
        tables = {f"{s.name}.parquet" for s in store.shards}
        problems += [f"{p} does not belong in the row columns' folder (remove it)" for p in
                     sorted((path / f"{space}{COLUMNS_SUFFIX}").iterdir())
                     if not p.name.startswith(".") and p.name not in tables]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise StoreError(f"space {space!r} of {path} cannot be published yet: {'; '.join(problems[:5])}{more}. Run "
                         "the writers of those shards again (the same command; e.g. the array-job tasks that did "
                         "not finish), then finalize again")
    entry = {**record, "sha256": sha, **({"columns_sha256": col_sha} if has_columns else {})}
    with manifest_lock(path).acquire(wait=MANIFEST_WAIT):
        fresh = Store(path)
        if fresh.manifest["spaces"].get(space) == entry:
            return fresh
        write_manifest(path, {**fresh.manifest, "spaces": {**fresh.manifest["spaces"], space: entry}})
    return Store(path)
