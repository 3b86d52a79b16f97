"""Fingerprints, same process: of training files (``content_key``), or of a stored gallery (``--array_mb``).

Training files: the per-item path fingerprints every training file (path, size, mtime) once per transformation run,
to key h's feature cache; one thread vs :func:`~fct_lightning.data.fingerprint.stat_all`. ``--latency`` adds a
sleep to each ``os.stat`` to stand in for network storage, where each call waits for a round trip (a sleep, like a
blocked system call, releases the GIL); 0 measures the local disk.

    python bench/bench_fingerprint.py --files 20000 --latency 0.0002

Stored gallery: :func:`~fct_lightning.gallery.files.fingerprint` (the streaming sha256 of a whole ``.npy``, which
fct-transform checks for each input and writes for each output) against a plain read of the same file, in the same
blocks, in MB/s; the file is read once first, so both read it from the page cache and the ratio is the cost of
hashing (a disk slower than the hash bounds both).

    python bench/bench_fingerprint.py --array_mb 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fct_lightning.data import base
from fct_lightning.gallery.files import BLOCK, fingerprint


def serial_fingerprint(paths: list[str], root: str) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def plain_read(path: Path) -> int:
    """Read ``path`` as :func:`fingerprint` does, without hashing; returns the bytes read."""
    buf = bytearray(BLOCK)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            total += n
    return total


def bench_array(mb: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root, "gallery.npy")
        rows, dim = (mb << 20) // (128 * 4), 128
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
        rng = np.random.default_rng(0)
        for start in range(0, rows, 1 << 16):
            arr[start:start + (1 << 16)] = rng.standard_normal((min(1 << 16, rows - start), dim), dtype=np.float32)
        arr.flush()
        del arr
        size = path.stat().st_size
        plain_read(path)  # into the page cache
        for rep in range(repeats):
            t0 = time.perf_counter()
            assert plain_read(path) == size
            t1 = time.perf_counter()
            fp = fingerprint(path)
            t2 = time.perf_counter()
            read_mbs, hash_mbs = size / 1e6 / (t1 - t0), size / 1e6 / (t2 - t1)
            print(f"run {rep}: {size / 1e6:.0f} MB gallery ({rows} x {dim} float32), blocks of {BLOCK >> 20} MiB: "
                  f"plain read {t1 - t0:.3f} s ({read_mbs:.0f} MB/s), sha256 fingerprint {t2 - t1:.3f} s "
                  f"({hash_mbs:.0f} MB/s, {(t2 - t1) / (size / 1e9):.2f} s per GB): {(t2 - t1) / (t1 - t0):.2f}x "
                  f"the plain read ({fp[:15]}...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each os.stat (0 = local disk)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--array_mb", type=int, default=0,
                    help="instead: the stored-gallery fingerprint of an array of this many MiB (0 = the file list)")
    args = ap.parse_args()
    if args.array_mb:
        bench_array(args.array_mb, args.repeats)
        return
    with tempfile.TemporaryDirectory() as root:
        paths = []
        for i in range(args.files):
            d = Path(root, str(i // 1000))
            d.mkdir(exist_ok=True)
            (d / f"{i}.jpg").write_bytes(b"")
            paths.append(str(d / f"{i}.jpg"))
        real_stat = os.stat

        def stat(path, *a, **k):
            time.sleep(args.latency)
            return real_stat(path, *a, **k)

        if args.latency > 0:
            os.stat = stat
        try:
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                ref = serial_fingerprint(paths, root)
                t1 = time.perf_counter()
                got = base.files_fingerprint(paths, root)
                t2 = time.perf_counter()
                assert got == ref, "fingerprints differ"
                print(f"run {rep}: {args.files} files, latency {args.latency * 1e3:.2f} ms: one thread "
                      f"{t1 - t0:.3f} s, stat_all {t2 - t1:.3f} s, speed-up {(t1 - t0) / (t2 - t1):.2f}x")
        finally:
            os.stat = real_stat


if __name__ == "__main__":
    main()
