"""fct-index / fct-search on a store: build seconds and peak memory per index type, search queries/s, and
recall@k against exact search (Flat), with ratios to Flat.

    python bench/bench_index.py --store /tmp/fct-bench-store --space old              # 10M x 128 float16
    python bench/bench_index.py --store /tmp/fct-bench-store --max_shards 1           # its first shard only
    python bench/bench_index.py --synthetic 200000                                    # a 200k x 128 store, made here

Each index is built with :func:`fct_lightning.index.build_index` (uniform random training sample, shard by
shard), read back and searched in memory with :func:`fct_lightning.index.search_arrays`. Queries are stored rows
picked at random plus Gaussian noise (a tenth of the rows' spread), so the nearest item is not always the
query's own row. Peak memory is the process's VmHWM, reset before each build (``/proc/self/clear_refs``), so it
includes what the process held before the build (the queries, FAISS itself): that baseline is printed too.
``--max_shards M`` benches a view of the first ``M`` shards (a manifest of those shards with links to their files,
in the work folder); the store itself is never written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from fct_lightning.index import build_index, load_index, search_arrays
from fct_lightning.store import SpaceSpec, Store, create_store, open_store, write_space


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmHWM``: peak resident memory, ``VmRSS``: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine() -> str:
    """The CPU model, cores, memory, FAISS version and GPUs of this machine, in one line."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    return (f"{cpu}, {os.cpu_count()} cores ({faiss.omp_get_max_threads()} FAISS threads), {mem / 2**20:.0f} GiB, "
            f"python {platform.python_version()}, faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s)")


def synthetic(path: Path, rows: int, dim: int, shard_rows: int) -> Store:
    """A store of ``rows`` float16 points around 1,000 random centres (space ``old``), made once."""
    store = create_store(path, (str(k) for k in range(rows)), shard_rows=shard_rows, provenance={"bench": "index"})
    if "old" not in store.spaces:
        centres = np.random.default_rng(0).standard_normal((1000, dim), dtype=np.float32)

        def produce(i: int) -> np.ndarray:
            rng = np.random.default_rng([1, i])
            n = store.shards[i].rows
            return (centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32))

        write_space(store, "old", SpaceSpec(role="old", dim=dim, dtype="float16"), produce)
    return open_store(path)


def first_shards(store: Store, shards: int, path: Path) -> Store:
    """A read-only view of ``store``'s first ``shards`` shards at ``path``: a manifest of them, links to files."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "meta").mkdir(parents=True)
    manifest = json.loads((store.path / "manifest.json").read_bytes())
    manifest["shards"] = manifest["shards"][:shards]
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    for name, space in manifest["spaces"].items():
        space["sha256"] = space["sha256"][:shards]
        (path / name).mkdir()
        for i in range(shards):
            (path / name / f"{store.shards[i].name}.npy").symlink_to(store.array_path(name, i).resolve())
    for i in range(shards):
        (path / "meta" / f"{store.shards[i].name}.parquet").symlink_to(store.meta_path(i).resolve())
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return open_store(path)


def queries_of(store: Store, space: str, n: int, seed: int = 1) -> np.ndarray:
    """``n`` random stored rows (float32) plus noise of a tenth of their spread."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.rows, size=min(n, store.rows), replace=False))
    picked = []
    for shard in store.shards:
        a, b = np.searchsorted(rows, [shard.start, shard.stop])
        picked.append(store.array(space, shard.index)[rows[a:b] - shard.start].astype(np.float32))
    q = np.concatenate(picked)
    return q + 0.1 * q.std() * rng.standard_normal(q.shape, dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="/tmp/fct-bench-store", help="an existing store (not written)")
    p.add_argument("--space", default="old")
    p.add_argument("--max_shards", type=int, default=None, help="bench the first M shards only")
    p.add_argument("--synthetic", type=int, default=None, metavar="ROWS",
                   help="bench a synthetic ROWS x --dim store made in the work folder instead of --store")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,PQ32", "HNSW32"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=16, help="for the IVF indexes")
    p.add_argument("--work", default=None, help="where the indexes go (default: a temporary folder, removed)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-index-"))
    try:
        if args.synthetic:
            store = synthetic(work / "store", args.synthetic, args.dim, max(1, args.synthetic // 4))
        else:
            store = open_store(args.store)
            if args.max_shards:
                store = first_shards(store, args.max_shards, work / "view")
        info = store.space(args.space)
        print(f"machine: {machine()}")
        print(f"store: {store.path}, space {args.space}: {store.rows:,} x {info.dim} {info.dtype} in "
              f"{len(store.shards)} shard(s); {args.queries} queries, k {args.k}, nprobe {args.nprobe}")
        q = queries_of(store, args.space, args.queries)
        results, exact = [], None
        for factory in ["Flat", *(f for f in args.factories if f != "Flat")]:
            base = status_kb("VmRSS")
            resettable = reset_peak()
            t = time.perf_counter()
            record = build_index(store, args.space, factory, work / "index", overwrite=True)
            build_s, peak = time.perf_counter() - t, status_kb("VmHWM")
            size = sum(f.stat().st_size for f in (work / "index").iterdir())
            index, _ = load_index(work / "index")
            nprobe = args.nprobe if "IVF" in factory else None
            search_arrays(index, q[:10], args.k, nprobe)  # warm up
            t = time.perf_counter()
            _, rows = search_arrays(index, q, args.k, nprobe)
            qps = len(q) / (time.perf_counter() - t)
            exact = rows if exact is None else exact
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, exact, strict=True)])
            results.append((factory, build_s, base, peak, size, qps, recall, record["train"]["rows"]))
            del index
        flat = results[0]
        print(f"{'index':>16} {'train rows':>10} {'build s':>9} {'x Flat':>7} {'RSS before':>10} "
              f"{'peak RSS':>9} {'x Flat':>7} {'file MB':>8} {'queries/s':>10} {'x Flat':>7} recall@{args.k}")
        for factory, build_s, base, peak, size, qps, recall, train in results:
            print(f"{factory:>16} {train:>10,} {build_s:>9.2f} {build_s / flat[1]:>7.2f} {base / 1024:>8.0f}MB "
                  f"{peak / 1024:>7.0f}MB {peak / flat[3]:>7.2f} {size / 2**20:>8.1f} {qps:>10,.0f} "
                  f"{qps / flat[5]:>7.2f} {recall:.4f}")
        if not resettable:
            print("(peak RSS could not be reset between builds: each is the peak so far)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
