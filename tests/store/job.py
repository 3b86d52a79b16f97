"""A store-writing job the tests run in subprocesses (to kill it, or to run several side by side).

``python tests/store/job.py STORE [--part i/n] [--sleep S] [--slow_write S] [--finalize]``: creates STORE (the
items of :func:`items`, if it is not there yet) and writes space ``old`` from :func:`rows`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fct_lightning.store import SpaceSpec, create_store, finalize_space, write_space
from fct_lightning.store import files as store_files

ROWS, SHARD_ROWS, DIM = 530, 100, 16
SPEC = SpaceSpec(role="old", dim=DIM, dtype="float16", checkpoint_digest="sha256:old", provenance={"test": "job"})


def items() -> list[str]:
    """The ids of the test store's items."""
    return [f"img-{k:04d}.jpg" for k in range(ROWS)]


def rows(start: int, stop: int) -> np.ndarray:
    """The embeddings of rows ``start`` to ``stop - 1``: the same whichever process computes them."""
    k = np.arange(start, stop, dtype=np.float32)[:, None]
    return np.sin(k * 0.37 + np.arange(DIM, dtype=np.float32) * 1.3).astype(np.float32)


def run(path: str, part: str | None = None, sleep: float = 0.0, finalize: bool = False) -> list[int]:
    store = create_store(path, items(), labels=np.arange(ROWS) % 5, shard_rows=SHARD_ROWS)

    def produce(i: int) -> np.ndarray:
        time.sleep(sleep)
        return rows(store.shards[i].start, store.shards[i].stop)

    shards = None
    if part:
        i, n = map(int, part.split("/"))
        shards = store.shards_for(i, n)
    written = write_space(store, "old", SPEC, produce, shards=shards)
    if finalize:
        finalize_space(store, "old")
    return written


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--part", default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--slow_write", type=float, default=0.0, help="seconds per block written (small blocks)")
    p.add_argument("--finalize", action="store_true")
    args = p.parse_args()
    if args.slow_write:
        store_files.CHUNK_BYTES = 512
        plain = store_files.write_block

        def slow(fh, data):  # noqa: ANN001
            time.sleep(args.slow_write)
            plain(fh, data)

        store_files.write_block = slow
    print(run(args.store, args.part, args.sleep, args.finalize), flush=True)
