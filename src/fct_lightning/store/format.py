"""What a store is on disk: names, the manifest's schema and its validation, and the errors of this package.

A store is a folder for one set of items::

    STORE/manifest.json              the format and version, the shards (name, rows, sha256 of their meta file),
                                     the total rows, and per space: role, checkpoint digest, dim, dtype,
                                     normalised or not, the sha256 of every shard, free-form provenance
    STORE/meta/part-00000.parquet    one row per item, in shard order: id (string, unique), label (optional int64)
                                     and any other columns
    STORE/<space>/part-00000.npy     one [rows, dim] float16 or float32 array per shard, aligned with the meta shard
    STORE/<space>.columns/part-00000.parquet
                                     only for a space with row columns (e.g. fct-backfill's ``source``: which model
                                     made each row): one table per shard, aligned with the meta shard

Row columns live beside their space's folder, not in it, so that ``STORE/<space>`` stays exactly what
embedding-reader and autofaiss read (every file there is a shard array); a space name holds no ``.``, so no space
folder is ever called ``<name>.columns``. Work files live in hidden folders that readers (embedding-reader globs
``**/*.npy`` and ``**/*.parquet``) never match: ``STORE/.locks/`` and ``STORE/<space>/.progress/`` (per-shard
records, locks and temporary files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "fct-lightning store"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta"
DTYPES = ("float16", "float32")
DEFAULT_SHARD_ROWS = 1_000_000
SPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
COLUMNS_SUFFIX = ".columns"
COLUMN_TYPES = ("int8", "int16", "int32", "int64", "float32", "float64", "string")
COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SOURCE = "source"
"""The row column of a backfilled space (int16): 0 = h's transformed vector, k >= 1 = new-model embedding of round
k (``fct-backfill --store`` writes it)."""


class StoreError(ValueError):
    """A store (or an input to one) is not as it should be; the message names the file or shard and the fix."""


class StoreLocked(StoreError):
    """Another live process holds the lock on what this one was about to write."""


def shard_name(index: int) -> str:
    """``part-00007`` for shard 7 (five digits, more past 99,999 shards: names still sort in shard order)."""
    return f"part-{index:05d}"


def check_space_name(space: str) -> str:
    """``space`` if it can be a store folder name: letters, digits, ``_``, ``+``, ``-``, at most 64, not ``meta``."""
    if not isinstance(space, str) or not SPACE_NAME.fullmatch(space) or space == META:
        raise StoreError(f"space name {space!r} cannot be a store folder: use letters, digits, '_', '+' or '-' "
                         "(at most 64, starting with a letter or digit, not 'meta'), e.g. 'old', 'side_info', "
                         "'fct+side'")
    return space


@dataclass(frozen=True)
class Shard:
    """One shard of a store: its position, file stem, row count and first row in store order."""

    index: int
    name: str
    rows: int
    start: int

    @property
    def stop(self) -> int:
        """One past the shard's last row in store order."""
        return self.start + self.rows


@dataclass(frozen=True)
class SpaceSpec:
    """What a space holds, as its writer declares it (and the manifest records it).

    Args:
        role: the model role that made the rows (``old``, ``side_info``, ``new``, ``transformation``, ...).
        dim: the embedding dimension ``d`` of every row.
        dtype: ``float16`` or ``float32``, as stored on disk (rows given as other floats are converted).
        checkpoint_digest: the digest of the checkpoint that made the rows, or None when unknown.
        normalized: whether every row is L2-normalised.
        provenance: free-form JSON-able facts: which command, which inputs (no timestamps or hosts, so that a
            rerun of the same command is recognised as the same job and resumes).
        columns: per-row columns stored with the space, name -> type (one of :data:`COLUMN_TYPES`), e.g.
            ``{"source": "int16"}``: one parquet table per shard in ``STORE/<space>.columns/``, written, checked
            and published with the shard's array (:meth:`SpaceWriter.write_shard` takes their values).
    """

    role: str
    dim: int
    dtype: str = "float32"
    checkpoint_digest: str | None = None
    normalized: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise StoreError(f"role {self.role!r} must be a non-empty string such as 'old' or 'side_info'")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise StoreError(f"dim {self.dim!r} must be a positive integer (the embedding dimension)")
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r} is not stored; use one of {', '.join(DTYPES)}")
        if self.checkpoint_digest is not None and not isinstance(self.checkpoint_digest, str):
            raise StoreError(f"checkpoint_digest {self.checkpoint_digest!r} must be a string or None")
        if not isinstance(self.columns, dict):
            raise StoreError(f"columns {self.columns!r} must be a dict of column name -> type")
        for name, kind in self.columns.items():
            if not isinstance(name, str) or not COLUMN_NAME.fullmatch(name) or kind not in COLUMN_TYPES:
                raise StoreError(f"row column {name!r}: {kind!r} cannot be stored; names are letters, digits and '_' "
                                 f"(not starting with a digit), types one of {', '.join(COLUMN_TYPES)}")

    def record(self) -> dict[str, Any]:
        """The spec as the manifest holds it (``columns`` only when there are some: older records stay as they
        were, and so do their job keys)."""
        rec = {"role": self.role, "checkpoint_digest": self.checkpoint_digest, "dim": self.dim,
               "dtype": self.dtype, "normalized": bool(self.normalized), "provenance": self.provenance}
        return {**rec, "columns": dict(sorted(self.columns.items()))} if self.columns else rec


@dataclass(frozen=True)
class Space(SpaceSpec):
    """A published space: its spec, its name, and the sha256 (``sha256:<hex>``) of each shard, in shard order (and
    of each shard's row-column table, when the space has row columns)."""

    name: str = ""
    sha256: tuple[str, ...] = ()
    columns_sha256: tuple[str, ...] = ()


def _fail(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} is not a valid store manifest: {what}. Restore it from a copy, or re-create the "
                      "store (fct-store import)")


def _int(value: Any, path: Path, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(path, f"{what} is {value!r}, not an integer >= {low}")
    return value


def parse_manifest(data: Any, path: Path) -> tuple[list[Shard], dict[str, Space]]:
    """The shards and spaces of the manifest ``data`` read from ``path``; a StoreError names what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not an fct-lightning store manifest (its format is "
                         f"{data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise StoreError(f"{path} has store format version {data.get('version')!r}; this fct-lightning reads "
                         f"version {VERSION}: install the fct-lightning that wrote it (or a newer one)")
    shard_rows = _int(data.get("shard_rows"), path, "shard_rows", 1)
    entries = data.get("shards")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "it lists no shards")
    shards, start = [], 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("name") != shard_name(i):
            raise _fail(path, f"shard {i} is {entry!r}, expected name {shard_name(i)!r}")
        rows = _int(entry.get("rows"), path, f"the rows of {shard_name(i)}", 1)
        if rows > shard_rows or (rows != shard_rows and i != len(entries) - 1):
            raise _fail(path, f"{shard_name(i)} has {rows} rows; every shard but the last has shard_rows "
                              f"({shard_rows})")
        shards.append(Shard(i, shard_name(i), rows, start))
        start += rows
    if data.get("rows") != start:
        raise _fail(path, f"its rows ({data.get('rows')!r}) are not the sum of its shards' rows ({start})")
    spaces = data.get("spaces")
    if not isinstance(spaces, dict):
        raise _fail(path, "'spaces' is not an object")
    return shards, {name: _space(name, entry, len(shards), path) for name, entry in spaces.items()}


def _space(name: str, entry: Any, n_shards: int, path: Path) -> Space:
    check_space_name(name)
    if not isinstance(entry, dict):
        raise _fail(path, f"space {name!r} is {entry!r}")
    sha = entry.get("sha256")
    if not isinstance(sha, list) or len(sha) != n_shards or not all(isinstance(s, str) for s in sha):
        raise _fail(path, f"space {name!r} does not list one sha256 per shard ({n_shards})")
    columns, col_sha = entry.get("columns") or {}, entry.get("columns_sha256") or []
    if columns and (not isinstance(col_sha, list) or len(col_sha) != n_shards
                    or not all(isinstance(s, str) for s in col_sha)):
        raise _fail(path, f"space {name!r} has row columns but does not list one columns_sha256 per shard "
                          f"({n_shards})")
    try:
        return Space(role=entry.get("role"), dim=entry.get("dim"), dtype=entry.get("dtype"),
                     checkpoint_digest=entry.get("checkpoint_digest"), normalized=bool(entry.get("normalized")),
                     provenance=entry.get("provenance") or {}, columns=columns, name=name, sha256=tuple(sha),
                     columns_sha256=tuple(col_sha) if columns else ())
    except StoreError as err:
        raise _fail(path, f"space {name!r}: {err}") from err
