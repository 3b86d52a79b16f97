"""File fingerprints (``content_key``): one thread vs :func:`~fct_lightning.data.base.stat_all`, same process.

The per-item path fingerprints every training file (path, size, mtime) once per transformation run, to key h's
feature cache. ``--latency`` adds a sleep to each ``os.stat`` to stand in for network storage, where each call
waits for a round trip (a sleep, like a blocked system call, releases the GIL); 0 measures the local disk.

    python bench/bench_fingerprint.py --files 20000 --latency 0.0002
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fct_lightning.data import base


def serial_fingerprint(paths: list[str], root: str) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each os.stat (0 = local disk)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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
