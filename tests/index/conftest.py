"""Small stores for the index tests: a clustered 16-d float16 gallery in 6 shards (the last one short), whose ids
are not its row numbers, and a store of queries near gallery items (space ``new``, 16-d, and ``small``, 8-d)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fct_lightning.store import SpaceSpec, Store, create_store, write_space

ROWS, SHARD_ROWS, DIM, QUERIES = 2600, 500, 16, 150


def gallery_rows(seed: int = 0) -> np.ndarray:
    """``ROWS`` points around 12 centres (so that IVF lists mean something), as float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM)) * 3
    return (centres[rng.integers(0, 12, ROWS)] + rng.standard_normal((ROWS, DIM))).astype(np.float32)


def write_rows(store: Store, space: str, rows: np.ndarray, dtype: str = "float16", version: int = 1) -> Store:
    """Write ``rows`` (aligned with ``store``'s items) as ``space``; the store opened again. Another ``version``
    replaces the space (the same one would be taken for a rerun of the same job, and kept)."""
    spec = SpaceSpec(role=space, dim=rows.shape[1], dtype=dtype, provenance={"version": version})
    write_space(store, space, spec, lambda i: rows[store.shards[i].start:store.shards[i].stop],
                overwrite=version > 1)
    return Store(store.path)


def all_rows(store: Store, space: str) -> np.ndarray:
    """Every row of ``space`` as float32, in store order."""
    return np.concatenate([store.array(space, i) for i in range(len(store.shards))]).astype(np.float32)


@pytest.fixture
def gallery(tmp_path: Path) -> Store:
    """The gallery store, space ``old``; item ``r``'s id is ``g-<perm[r]>`` (not its row number)."""
    perm = np.random.default_rng(1).permutation(ROWS)
    store = create_store(tmp_path / "gallery", [f"g-{p}" for p in perm], shard_rows=SHARD_ROWS)
    return write_rows(store, "old", gallery_rows())


@pytest.fixture
def queries(tmp_path: Path, gallery: Store) -> Store:
    """``QUERIES`` queries near random gallery rows, in 2 shards: space ``new`` (16-d) and ``small`` (8-d)."""
    rng = np.random.default_rng(2)
    near = all_rows(gallery, "old")[rng.choice(ROWS, QUERIES, replace=False)]
    store = create_store(tmp_path / "queries", [f"q-{k}" for k in range(QUERIES)], shard_rows=100)
    store = write_rows(store, "new", near + 0.3 * rng.standard_normal(near.shape).astype(np.float32), "float32")
    return write_rows(store, "small", rng.standard_normal((QUERIES, 8)).astype(np.float32), "float32")
