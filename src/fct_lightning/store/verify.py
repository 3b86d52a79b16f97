"""Checking a whole store against its manifest: files, sizes, checksums, row counts, ids, finite rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from fct_lightning.store.create import first_duplicate
from fct_lightning.store.files import CHUNK_BYTES, npy_size, sha256_file
from fct_lightning.store.format import COLUMNS_SUFFIX, META, Shard, StoreError
from fct_lightning.store.store import Store


def _extra(folder: Path, expected: set[str]) -> list[str]:
    if not folder.is_dir():
        return [f"{folder} is missing; restore it, or re-create the store"]
    return [f"{p} is not part of the store (a reader of the folder would take it as a shard); move it elsewhere"
            for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.name not in expected]


def _meta_problems(store: Store, check_content: bool) -> list[str]:
    problems = _extra(store.path / META, {f"{s.name}.parquet" for s in store.shards})
    fix = "restore it from a copy, or re-create the store in a new folder"
    hashes, ids = [], {}
    for shard in store.shards:
        path = store.meta_path(shard.index)
        if not path.is_file():
            problems.append(f"{path} is missing; {fix}")
            continue
        if check_content and sha256_file(path) != store.manifest["shards"][shard.index].get("meta_sha256"):
            problems.append(f"{path} does not match its sha256 in the manifest (it was changed or damaged); {fix}")
            continue
        try:
            col = store.meta(shard.index, ["id"]).column("id")
        except (StoreError, KeyError, pa.ArrowException) as err:
            problems.append(f"{err}")
            continue
        if not pa.types.is_string(col.type) or col.null_count:
            problems.append(f"{path}: the id column must hold a string for every item (it is {col.type}, "
                            f"{col.null_count} missing); {fix}")
            continue
        ids[shard.index] = col.to_pylist()
        hashes.append(np.fromiter((hash(s) for s in ids[shard.index]), np.int64, shard.rows))
    if len(ids) == len(store.shards):
        dup = first_duplicate(np.concatenate(hashes), lambda r: ids[r // store.shard_rows][r % store.shard_rows])
        if dup is not None:
            problems.append(f"id {ids[dup[0] // store.shard_rows][dup[0] % store.shard_rows]!r} is in rows {dup[0]} "
                            f"and {dup[1]}: ids must be unique; re-create the store with unique ids")
    return problems


def _fix(space: str) -> str:
    return f"run the command that wrote space {space!r} again (it rewrites such shards), or restore the file"


def _present(store: Store, path_of: Callable[[str, int], Path], space: str, problems: list[str],
             fix: str) -> Iterator[tuple[Shard, Path]]:
    """``(shard, file)`` for each shard whose file of ``space`` exists; a message in ``problems`` per missing one."""
    for shard in store.shards:
        path = path_of(space, shard.index)
        if path.is_file():
            yield shard, path
        else:
            problems.append(f"{path} is missing; {fix}")


def _checksum_problems(path: Path, sha256: str, check_content: bool, fix: str) -> list[str]:
    """``[message]`` when ``check_content`` and the file's sha256 is not the manifest's; ``[]`` otherwise."""
    if check_content and sha256_file(path) != sha256:
        return [f"{path} does not match its sha256 in the manifest (it was changed or damaged); {fix}"]
    return []


def _space_problems(store: Store, name: str, check_content: bool) -> list[str]:
    space, folder = store.space(name), store.path / name
    problems = _extra(folder, {f"{s.name}.npy" for s in store.shards})
    fix = _fix(name)
    for shard, path in _present(store, store.array_path, name, problems, fix):
        size, want = path.stat().st_size, npy_size(shard.rows, space.dim, space.dtype)
        if size != want:
            problems.append(f"{path} holds {size} bytes, not the {want} of {shard.rows} x {space.dim} {space.dtype} "
                            f"rows (truncated or replaced); {fix}")
            continue
        problems += _checksum_problems(path, space.sha256[shard.index], check_content, fix)
        try:
            arr = store.array(name, shard.index)
        except StoreError as err:
            problems.append(str(err))
            continue
        if check_content:
            problems += _non_finite(store, name, shard.index, arr)
    return problems + (_column_problems(store, name, check_content) if space.columns else [])


def _column_problems(store: Store, name: str, check_content: bool) -> list[str]:
    """The row columns of space ``name``: one table per shard, its checksum, its rows and its columns' types."""
    space = store.space(name)
    problems = _extra(store.path / f"{name}{COLUMNS_SUFFIX}", {f"{s.name}.parquet" for s in store.shards})
    fix = _fix(name)
    for shard, path in _present(store, store.columns_path, name, problems, fix):
        bad = _checksum_problems(path, space.columns_sha256[shard.index], check_content, fix)
        if bad:
            problems += bad
            continue
        try:
            table = store.row_columns(name, shard.index)
        except StoreError as err:
            problems.append(str(err))
            continue
        types = {f.name: str(f.type) for f in table.schema}
        want = {k: "string" if v == "string" else ("float" if v == "float32" else "double" if v == "float64" else v)
                for k, v in space.columns.items()}
        if types != want:
            problems.append(f"{path} holds the columns {types}, not the manifest's {want}; {fix}")
    return problems


def _non_finite(store: Store, name: str, i: int, arr: np.ndarray) -> list[str]:
    step, bad = max(1, CHUNK_BYTES // max(1, arr.shape[1] * arr.itemsize)), []
    for a in range(0, len(arr), step):
        bad.extend((a + np.flatnonzero(~np.isfinite(arr[a:a + step]).all(axis=1))).tolist())
    if not bad:
        return []
    return [f"{store.array_path(name, i)} has {len(bad)} row(s) with NaN or inf, first row {bad[0]} (item "
            f"{store.ids(i)[bad[0]]!r}); re-embed those items, or rewrite the space"]


def verify_store(store: Store | str | Path, spaces: Iterable[str] | None = None,
                 check_content: bool = True) -> list[str]:
    """Every problem of the store, one message per problem (empty when all is well).

    Args:
        store: the store (or its folder).
        spaces: the spaces to check (default: all published ones); the meta shards are always checked.
        check_content: read every file (sha256, NaN/inf rows); False checks only presence, sizes and headers.
    """
    try:
        store = store if isinstance(store, Store) else Store(store)
    except (StoreError, FileNotFoundError) as err:
        return [str(err)]
    problems = _meta_problems(store, check_content)
    for name in store.spaces if spaces is None else spaces:
        try:
            problems += _space_problems(store, name, check_content)
        except StoreError as err:
            problems.append(str(err))
    return problems
