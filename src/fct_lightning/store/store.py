"""Reading a store (:class:`Store`), and the manifest's lock and atomic replacement that every writer uses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_lightning.store.files import FileLock, write_bytes
from fct_lightning.store.format import (
    COLUMNS_SUFFIX,
    MANIFEST,
    META,
    SOURCE,
    Shard,
    Space,
    StoreError,
    parse_manifest,
)

LOCKS = ".locks"
MANIFEST_WAIT = 60.0
"""Seconds a writer waits for another to finish replacing the manifest (it holds that lock for milliseconds)."""


class Store:
    """A store opened for reading: its manifest, read and checked once, and its files.

    Args:
        path: the store's folder (the one holding ``manifest.json``).

    The object is a snapshot: after a space is published, open the store again to see it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not self.path.is_dir():
            raise FileNotFoundError(f"there is no store at {self.path}; create one with fct-store import (or "
                                    "fct_lightning.store.create_store)")
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} has no {MANIFEST}: it is not a store, or the job creating it did "
                                    "not finish (run that job again)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_bytes())
        except (OSError, ValueError) as err:
            raise StoreError(f"{manifest} cannot be read ({err}); restore it from a copy") from err
        self.shards, self.spaces = parse_manifest(self.manifest, manifest)

    @property
    def rows(self) -> int:
        """The number of items."""
        return int(self.manifest["rows"])

    @property
    def shard_rows(self) -> int:
        """The rows of every shard but the last."""
        return int(self.manifest["shard_rows"])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}: {self.rows} rows, {len(self.shards)} shards, spaces {list(self.spaces)})"

    def shard(self, shard: int) -> Shard:
        """The shard with index ``shard``."""
        if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or not 0 <= shard < len(self.shards):
            raise StoreError(f"shard {shard!r} is not one of the {len(self.shards)} shards of {self.path} (0 to "
                             f"{len(self.shards) - 1})")
        return self.shards[int(shard)]

    def space(self, space: str) -> Space:
        """The published space ``space``."""
        if space not in self.spaces:
            raise StoreError(f"{self.path} has no space {space!r} (it has {sorted(self.spaces) or 'none yet'}); "
                             "write it first (fct-store import, fct-embed or fct-transform)")
        return self.spaces[space]

    def meta_path(self, shard: int) -> Path:
        """``STORE/meta/part-NNNNN.parquet``."""
        return self.path / META / f"{self.shard(shard).name}.parquet"

    def array_path(self, space: str, shard: int) -> Path:
        """``STORE/<space>/part-NNNNN.npy``."""
        return self.path / space / f"{self.shard(shard).name}.npy"

    def columns_path(self, space: str, shard: int) -> Path:
        """``STORE/<space>.columns/part-NNNNN.parquet``: the row columns of ``space`` for ``shard``."""
        return self.path / f"{space}{COLUMNS_SUFFIX}" / f"{self.shard(shard).name}.parquet"

    def row_columns(self, space: str, shard: int, names: Sequence[str] | None = None) -> pa.Table:
        """The row columns of ``space`` for ``shard`` (all, or ``names``), one row per item in row order."""
        info, path, rows = self.space(space), self.columns_path(space, shard), self.shard(shard).rows
        missing = [n for n in (names or ()) if n not in info.columns]
        if not info.columns or missing:
            raise StoreError(f"space {space!r} of {self.path} has no row column {(missing or ['any'])[0]!r} (its "
                             f"columns: {sorted(info.columns) or 'none'})")
        try:
            table = pq.read_table(path, columns=list(names) if names is not None else None)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path} cannot be read ({err}); run fct-store verify {self.path} and rewrite space "
                             f"{space!r}") from err
        if table.num_rows != rows:
            raise StoreError(f"{path} holds {table.num_rows} rows but shard {self.shard(shard).name} has {rows}; "
                             f"run fct-store verify {self.path} and rewrite space {space!r}")
        return table

    def meta(self, shard: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The items of ``shard`` (all columns, or ``columns``), in row order."""
        path, rows = self.meta_path(shard), self.shard(shard).rows
        try:
            table = pq.read_table(path, columns=list(columns) if columns is not None else None)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path} cannot be read ({err}); run fct-store verify {self.path}, and restore the "
                             "file or re-create the store") from err
        if table.num_rows != rows:
            raise StoreError(f"{path} holds {table.num_rows} items but the manifest says {rows}; the store's files "
                             f"do not belong together: run fct-store verify {self.path}")
        return table

    def ids(self, shard: int) -> list[str]:
        """The item ids of ``shard``, in row order."""
        return self.meta(shard, ["id"]).column("id").to_pylist()

    def labels(self, shard: int) -> np.ndarray | None:
        """The int64 labels of ``shard``'s items, or None when the store has no label column."""
        if "label" not in self.manifest.get("columns", {}):
            return None
        return self.meta(shard, ["label"]).column("label").to_numpy(zero_copy_only=False).astype(np.int64)

    def array(self, space: str, shard: int, mmap: bool = True) -> np.ndarray:
        """The ``[rows, dim]`` array of ``space`` for ``shard`` (memory-mapped, read-only, unless ``mmap=False``)."""
        info, path, rows = self.space(space), self.array_path(space, shard), self.shard(shard).rows
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise StoreError(f"{path} cannot be read as a .npy array ({err}); run fct-store verify {self.path} and "
                             f"rewrite space {space!r}") from err
        if arr.shape != (rows, info.dim) or arr.dtype != np.dtype(info.dtype):
            raise StoreError(f"{path} holds a {arr.dtype} {list(arr.shape)} array but the manifest says "
                             f"{info.dtype} [{rows}, {info.dim}]: the shard was changed or replaced. Run fct-store "
                             f"verify {self.path}, and rewrite space {space!r} (with overwrite)")
        return arr

    def iter_rows(self, space: str, batch_rows: int,
                  shards: Iterable[int] | None = None) -> Iterator[tuple[Shard, int, np.ndarray]]:
        """Stream ``space`` as ``(shard, offset in the shard, [<= batch_rows, dim] block)``, shard by shard.

        The blocks are views of the memory-mapped shard files (memory stays bounded whatever the store's size);
        copy what must outlive the next block. ``shards`` restricts the stream (e.g. :meth:`shards_for`).
        """
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise StoreError(f"batch_rows {batch_rows!r} must be a positive integer")
        for i in (range(len(self.shards)) if shards is None else shards):
            arr = self.array(space, i)
            for start in range(0, len(arr), batch_rows):
                yield self.shard(i), start, arr[start:start + batch_rows]

    def shards_for(self, rank: int, world: int) -> list[int]:
        """The shards that process ``rank`` of ``world`` writes: ``rank, rank + world, ...`` (array jobs, DDP)."""
        if not 0 <= rank < world:
            raise StoreError(f"rank {rank} must be between 0 and world - 1 = {world - 1}")
        return list(range(rank, len(self.shards), world))

    def digest(self, space: str | None = None) -> str:
        """``sha256:<hex>`` of the manifest's content (key order aside), or of its items and one ``space`` only.

        An index built on one space records ``digest(space)``: it stays valid when other spaces are added.
        """
        content = self.manifest
        if space is not None:
            self.space(space)
            content = {**{k: v for k, v in content.items() if k != "spaces"},
                       "spaces": {space: content["spaces"][space]}}
        return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def open_store(path: str | Path) -> Store:
    """The store at ``path``, its manifest read and checked (see :class:`Store`)."""
    return Store(path)


def read_source(store: Store, space: str) -> np.ndarray:
    """Per row of ``space``, which model made it (int16 ``[N]``): 0 = h's transformed vector (every row of a space
    without the ``source`` column), ``k >= 1`` = the new model's embedding, written in backfill round ``k``."""
    if SOURCE not in store.space(space).columns:
        return np.zeros(store.rows, np.int16)
    return np.concatenate([store.row_columns(space, i, [SOURCE]).column(SOURCE).to_numpy().astype(np.int16)
                           for i in range(len(store.shards))])


def manifest_lock(path: Path) -> FileLock:
    """The lock a writer holds while it replaces ``path``'s manifest (and :func:`create_store` while it runs)."""
    return FileLock(path / LOCKS / "manifest.lock", f"the manifest of {path}")


ORDER = ("format", "version", "rows", "shard_rows", "columns", "provenance", "shards", "spaces")


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace ``path``'s manifest atomically (the caller holds :func:`manifest_lock`).

    The keys come in a fixed order and the spaces by name, so a manifest's bytes depend only on its content.
    """
    ordered = {k: manifest[k] for k in ORDER if k in manifest} | {k: v for k, v in manifest.items() if k not in ORDER}
    ordered["spaces"] = {name: manifest["spaces"][name] for name in sorted(manifest.get("spaces", {}))}
    data = (json.dumps(ordered, indent=1) + "\n").encode()
    write_bytes(path / MANIFEST, data, tmp=path / LOCKS / "manifest.tmp")
