"""Distances: the canonical torch distance is chunk-independent and equals a float64 reference; FAISS's pairwise
distances agree with it; the backend choice."""

from __future__ import annotations

import pytest
import torch

from fct_lightning.retrieval.neighbors import (
    canonical_distances,
    faiss_distance_block,
    resolve_backend,
)

faiss = pytest.importorskip("faiss")


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(150, 16, generator=gen), torch.randn(400, 16, generator=gen)


def test_canonical_distances_independent_of_chunk(data) -> None:
    q, g = data
    full = canonical_distances(q, g)
    parts = torch.cat([canonical_distances(q[s:s + 7], g) for s in range(0, len(q), 7)])
    assert torch.equal(full, parts)


def test_canonical_distances_equal_a_float64_reference(data) -> None:
    q, g = data
    ref = ((q[:, None].double() - g[None].double()) ** 2).sum(-1).float()
    torch.testing.assert_close(canonical_distances(q, g), ref, rtol=1e-6, atol=1e-6)


def test_faiss_pairwise_distances_agree_with_canonical(data) -> None:
    q, g = data
    torch.testing.assert_close(faiss_distance_block(q, g), canonical_distances(q, g), rtol=1e-4, atol=1e-4)


def test_auto_backend_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "faiss"
