"""Helpers of the store tests: a small multi-shard store and a byte-level picture of a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.store import job


def tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A store of :mod:`tests.store.job`'s items (6 shards, the last one short) with space ``old`` written."""
    path = tmp_path / "store"
    job.run(str(path))
    return path


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted run of the job."""
    path = tmp_path_factory.mktemp("reference") / "store"
    job.run(str(path))
    return tree(path)


def old_rows(store) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([store.array("old", i) for i in range(len(store.shards))])
