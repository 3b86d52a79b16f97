"""Building a FAISS index on one space of a store: any ``index_factory`` string, trained on a uniform random
sample of the whole store, filled shard by shard with the store's global row numbers as FAISS ids.

Why a random sample: training on the first N rows (what autofaiss does) fits the centroids to whatever the first
shards hold (one crawl, one date, one class range) and its users reported the bias (autofaiss issue #99). The
sample here is seeded, spread over every shard in proportion, and read shard by shard from the memory-mapped
files (memory: the sample, plus one batch).

Ids: an index type that takes ids (IVF, IDMap) gets each row's global number; one that does not (Flat, HNSW,
PQ, ...) gets the rows in store order from row 0, so its sequential ids are the same numbers, without the id
table and reverse map an ``IndexIDMap2`` wrapper would add. :func:`fct_lightning.index.search` maps them back to
the store's string ids.

Indexes larger than memory (``ondisk=True``, IVF types): each shard is added to a copy of the trained index and
written as a part; the parts' inverted lists are then merged into one memory-mapped file
(``faiss.contrib.ondisk.merge_ondisk``). Parts are kept in ``INDEX.partial/`` until the index is complete, so a
killed build run again trains nothing and redoes only the shards without a part (an in-memory build reuses the
trained index). The folder ``INDEX`` itself appears only when complete (see :mod:`fct_lightning.index.files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from fct_lightning.index.files import (
    FORMAT,
    INDEX_FILE,
    IVFDATA_FILE,
    RECORD_FILE,
    VERSION,
    faiss_metric,
    faiss_module,
    use_gpu,
)
from fct_lightning.store import Store, open_store
from fct_lightning.store.files import FileLock, dump_json, fsync_dir, read_json, write_bytes

log = logging.getLogger(__name__)
BATCH = 65536
MIN_TRAIN, MAX_TRAIN = 65536, 1 << 21


def make_index(dim: int, factory: str, metric: str = "l2") -> Any:
    """``faiss.index_factory(dim, factory, metric)``, with a message naming the string when FAISS rejects it."""
    faiss = faiss_module()
    code = faiss_metric(metric)
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"factory {factory!r} must be a FAISS index_factory string, e.g. 'Flat', 'IVF1024,Flat', "
                         "'IVF4096,PQ32', 'HNSW32'")
    try:
        return faiss.index_factory(int(dim), factory, code)
    except RuntimeError as err:
        raise ValueError(f"FAISS rejects the factory string {factory!r} for {dim}-d rows "
                         f"({str(err).splitlines()[-1].split(': ', 1)[-1]}); give an index_factory string such as "
                         "'Flat', 'IVF1024,Flat', 'IVF4096,PQ32' (the PQ size must divide the dim) or "
                         "'HNSW32'") from err


def ivf_of(index: Any) -> Any | None:
    """The IVF index inside ``index`` (through pre-transforms and id maps), or None when it has none."""
    try:
        return faiss_module().extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def default_train_rows(index: Any, rows: int) -> int:
    """The training sample size for ``index`` over ``rows`` items: 0 when it needs no training, else 256 rows
    per IVF list (FAISS's k-means uses no more), at least 65,536 (what PQ/SQ codebooks use) and at most
    2,097,152 (unless the lists need 39 each, FAISS's minimum), never more than ``rows``."""
    if index.is_trained:
        return 0
    ivf = ivf_of(index)
    nlist = int(ivf.nlist) if ivf is not None else 0
    return min(rows, max(39 * nlist, min(MAX_TRAIN, max(MIN_TRAIN, 256 * nlist))))


def training_rows(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct global row numbers drawn uniformly from ``range(total)`` with ``seed``, sorted (int64)."""
    if n > total:
        raise ValueError(f"train_rows {n} is more than the store's {total} rows; give at most {total}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def training_sample(store: Store, space: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows the index is trained on: ``(global row numbers [n], float32 rows [n, dim])``, read shard by shard."""
    rows = training_rows(store.rows, n, seed)
    sample = np.empty((n, store.space(space).dim), dtype=np.float32)
    for shard in store.shards:
        a, b = np.searchsorted(rows, [shard.start, shard.stop])
        if b > a:
            sample[a:b] = store.array(space, shard.index)[rows[a:b] - shard.start]
    return rows, sample


def _write_index(index: Any, path: Path) -> None:
    """``faiss.write_index`` through a temporary file renamed over ``path`` (a reader never sees a partial file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss_module().write_index(index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_gpu(index: Any) -> Any | None:
    """A copy of ``index`` on all of FAISS's GPUs, or None when this index type has no GPU version."""
    try:
        return faiss_module().index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:
        log.info("this index type does not run on the GPU (%s); using the CPU", str(err).splitlines()[-1])
        return None


def _train(index: Any, sample: np.ndarray, gpu: bool, factory: str) -> Any:
    """``index`` trained on ``sample``: on the GPU when ``gpu`` and FAISS can (else the IVF k-means at least)."""
    faiss = faiss_module()
    try:
        if gpu:
            clone = to_gpu(index)
            if clone is not None:
                clone.train(sample)
                return faiss.index_gpu_to_cpu(clone)
            ivf = ivf_of(index)
            if ivf is not None:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        index.train(sample)
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot train {factory!r} on {len(sample)} rows "
                         f"({str(err).splitlines()[-1].split(': ', 1)[-1]}); give more --train_rows or fewer "
                         "lists / smaller codebooks") from err
    return index


def _add_rows(index: Any, store: Store, space: str, shards: list[int], batch: int) -> str:
    """Add the rows of ``shards`` to ``index`` (float32 blocks, global row numbers as ids); returns how the ids
    were given: ``add_with_ids``, or ``sequential`` (types without ids, filled in store order from row 0)."""
    how = "add_with_ids"
    for shard, offset, block in store.iter_rows(space, batch, shards):
        x = np.ascontiguousarray(block, dtype=np.float32)
        if how == "sequential":
            index.add(x)
            continue
        ids = np.arange(shard.start + offset, shard.start + offset + len(x), dtype=np.int64)
        try:
            index.add_with_ids(x, ids)
        except RuntimeError as err:
            if "add_with_ids not implemented" not in str(err) or index.ntotal or ids[0] != 0:
                raise
            how = "sequential"
            index.add(x)
    return how


def _check(store: Store, space: str, factory: str, metric: str, train_rows: int | None, seed: int, batch: int,
           ondisk: bool) -> Any:
    info = store.space(space)
    index = make_index(info.dim, factory, metric)
    if train_rows is not None and (isinstance(train_rows, bool) or not isinstance(train_rows, int)
                                   or not 1 <= train_rows <= store.rows):
        raise ValueError(f"train_rows {train_rows!r} must be an integer from 1 to the store's {store.rows} rows")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative integer")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch {batch!r} must be a positive integer (rows added at a time)")
    if ondisk and ivf_of(index) is None:
        raise ValueError(f"--ondisk needs an IVF index (e.g. 'IVF4096,PQ32'); {factory!r} is a "
                         f"{type(index).__name__}, which FAISS keeps in memory only")
    if metric == "ip" and not info.normalized:
        log.info("space %r is not recorded as L2-normalised: inner products are not cosine similarities", space)
    return index


def _partial(partial: Path, params: dict[str, Any]) -> None:
    """Make ``partial`` the work folder of a build with ``params``, dropping one left by a build of other params."""
    if partial.exists() and read_json(partial / "build.json") != params:
        log.info("%s holds an unfinished build with other parameters; starting again", partial)
        shutil.rmtree(partial)
    (partial / "parts").mkdir(parents=True, exist_ok=True)
    (partial / "out").mkdir(exist_ok=True)
    write_bytes(partial / "build.json", dump_json(params))


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished ``partial/out`` to ``out`` (replacing an old index), then drop the work folder."""
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(partial / "out", out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def build_index(store: Store | str | Path, space: str, factory: str, out: str | Path, metric: str = "l2",
                train_rows: int | None = None, seed: int = 0, ondisk: bool = False, device: str = "auto",
                batch: int = BATCH, overwrite: bool = False) -> dict[str, Any]:
    """Build the FAISS index ``factory`` of ``store``'s ``space`` in the folder ``out``; resumable.

    Args:
        store: the store (or its folder).
        space: the space to index.
        factory: any ``faiss.index_factory`` string: ``Flat``, ``IVF4096,PQ32``, ``OPQ32,IVF65536_HNSW32,PQ32``,
            ``HNSW32``, ...
        out: the index folder (see :mod:`fct_lightning.index.files`); it must not exist unless ``overwrite``.
        metric: ``l2`` (squared Euclidean) or ``ip`` (inner product: cosine on L2-normalised rows).
        train_rows: the size of the uniform random training sample (default :func:`default_train_rows`); ignored
            by index types that need no training.
        seed: the seed of the sample.
        ondisk: keep the inverted lists in ``out/lists.ivfdata``, memory-mapped (IVF types only), for indexes
            larger than memory.
        device: ``auto`` (train on the GPU when FAISS has GPUs), ``cpu`` or ``cuda``. Rows are added on the CPU.
        batch: rows converted to float32 and added at a time.
        overwrite: replace an existing index at ``out`` (the old one stays until the new one is complete).

    Returns:
        The index's record (what ``out/index.json`` holds).
    """
    started = time.perf_counter()
    store = store if isinstance(store, Store) else open_store(store)
    out = Path(out)
    index = _check(store, space, factory, metric, train_rows, seed, batch, ondisk)
    gpu = use_gpu(device)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_train = 0 if index.is_trained else (train_rows or default_train_rows(index, store.rows))
    params = {"store_digest": store.digest(space), "space": space, "factory": factory, "metric": metric,
              "train_rows": n_train, "seed": seed, "ondisk": ondisk}
    partial = out.with_name(f"{out.name}.partial")
    with FileLock(out.with_name(f".{out.name}.lock"), f"the index {out}").acquire():
        if out.exists() and not overwrite:  # another job finished it while this one waited
            raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        _partial(partial, params)
        trained, sample_rows = partial / "trained.faiss", np.empty(0, dtype=np.int64)
        if n_train:
            sample_rows = training_rows(store.rows, n_train, seed)
            if trained.is_file():
                index = faiss_module().read_index(str(trained))
                log.info("reusing the trained index of an unfinished build (%s)", trained)
            else:
                t = time.perf_counter()
                index = _train(index, training_sample(store, space, n_train, seed)[1], gpu, factory)
                log.info("trained %s on %d rows in %.1f s", factory, n_train, time.perf_counter() - t)
                _write_index(index, trained)
        how = _fill(index, store, space, partial, batch, ondisk)
        record = {"format": FORMAT, "version": VERSION, "store": str(store.path.resolve()), "space": space,
                  "store_digest": params["store_digest"], "rows": store.rows, "dim": store.space(space).dim,
                  "dtype": store.space(space).dtype, "normalized": store.space(space).normalized,
                  "factory": factory, "metric": metric, "index_type": type(index).__name__, "ids": how,
                  "ondisk": ondisk, "train": {"rows": n_train, "seed": seed, "sample_sha256": "sha256:" + hashlib
                                              .sha256(sample_rows.astype("<i8").tobytes()).hexdigest()},
                  "device": "cuda" if gpu else "cpu", "faiss": faiss_module().__version__,
                  "seconds": round(time.perf_counter() - started, 3)}
        write_bytes(partial / "out" / RECORD_FILE, (json.dumps(record, indent=1) + "\n").encode())
        _publish(partial, out)
    log.info("indexed %d rows of %s/%s with %s in %.1f s: %s", store.rows, store.path, space, factory,
             record["seconds"], out)
    return record


def _fill(index: Any, store: Store, space: str, partial: Path, batch: int, ondisk: bool) -> str:
    """Add every row to the trained ``index`` and write it to ``partial/out``; returns how ids were given."""
    if not ondisk:
        how = _add_rows(index, store, space, list(range(len(store.shards))), batch)
        _write_index(index, partial / "out" / INDEX_FILE)
        return how
    faiss = faiss_module()
    trained = partial / "trained.faiss"
    if not trained.is_file():
        _write_index(index, trained)
    parts = []
    for shard in store.shards:
        part = partial / "parts" / f"{shard.name}.faiss"
        if not part.is_file():
            one = faiss.read_index(str(trained))
            _add_rows(one, store, space, [shard.index], batch)
            _write_index(one, part)
            log.info("added shard %s (%d rows)", shard.name, shard.rows)
        parts.append(str(part))
    from faiss.contrib.ondisk import merge_ondisk

    merged = faiss.read_index(str(trained))
    ivfdata = partial / "out" / IVFDATA_FILE
    ivfdata.unlink(missing_ok=True)
    merge_ondisk(merged, parts, str(ivfdata))
    _write_index(merged, partial / "out" / INDEX_FILE)
    return "add_with_ids"
