"""Top-k neighbour search: torch vs FAISS agreement, ties, exclude_self, cosine, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fct_lightning.retrieval import search
from fct_lightning.retrieval.neighbors import canonical_distances, resolve_backend

faiss = pytest.importorskip("faiss")


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(150, 16, generator=gen), torch.randn(400, 16, generator=gen)


def reference_topk(q: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool) -> np.ndarray:
    d = ((q[:, None].double() - g[None].double()) ** 2).sum(-1).numpy()
    out = []
    for i in range(len(q)):
        items = [j for j in range(len(g)) if not (exclude_self and j == i)]
        out.append(sorted(items, key=lambda j: (d[i, j], j))[:k])
    return np.array(out)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_faiss_and_torch_agree(data, distance: str) -> None:
    q, g = data
    dt, it = search(q, g, 10, distance, "torch")
    df, i_f = search(q, g, 10, distance, "faiss")
    assert torch.equal(it, i_f)
    assert torch.allclose(dt, df, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_matches_reference_with_exclude_self(data, backend: str) -> None:
    _, g = data
    _, idx = search(g, g, 5, "l2", backend, exclude_self=True, chunk_size=33)
    assert np.array_equal(idx.numpy(), reference_topk(g, g, 5, True))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ties_broken_by_index(backend: str) -> None:
    g = torch.tensor([[1.0], [-1.0], [1.0], [0.5], [2.0]])
    d, idx = search(torch.zeros(1, 1), g, 4, "l2", backend)
    assert idx.tolist() == [[3, 0, 1, 2]]
    assert d.tolist() == [[0.25, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_k_larger_than_gallery(backend: str) -> None:
    g = torch.randn(4, 3)
    d, idx = search(g, g, 10, "l2", backend, exclude_self=True)
    assert idx.shape == (4, 3) and d.shape == (4, 3)
    assert all(i not in row for i, row in enumerate(idx.tolist()))


def test_cosine_equals_l2_on_normalised(data) -> None:
    q, g = data
    d1, i1 = search(q * 3.0, g, 7, "cosine", "torch")
    d2, i2 = search(F.normalize(q * 3.0, p=2, dim=1), F.normalize(g, p=2, dim=1), 7, "l2", "torch")
    assert torch.equal(i1, i2) and torch.equal(d1, d2)


def test_canonical_distances_independent_of_chunk(data) -> None:
    q, g = data
    full = canonical_distances(q, g)
    parts = torch.cat([canonical_distances(q[s:s + 7], g) for s in range(0, len(q), 7)])
    assert torch.equal(full, parts)


def test_auto_backend_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "faiss"


def test_faiss_uncertified_rows_fall_back_exactly() -> None:
    # Huge norms make FAISS's float32 error bound large, so every row is recomputed exactly.
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(200, 8, generator=gen) * 1e3 + 1e4
    _, i_f = search(g[:20], g, 3, "l2", "faiss")
    _, it = search(g[:20], g, 3, "l2", "torch")
    assert torch.equal(i_f, it)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distance": "dot"}, r"distance='dot'.*allowed values: 'l2', 'cosine'"),
        ({"backend": "annoy"}, r"backend='annoy'.*allowed values: 'auto', 'torch', 'faiss'"),
        ({"k": 0}, r"k=0 must be a positive integer"),
        ({"gallery": torch.randn(5, 4)}, r"query has dimension d=3 .* gallery has d=4"),
        ({"exclude_self": True}, r"exclude_self=True needs len\(query\) == len\(gallery\), got 2 and 5"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    args = {"query": torch.randn(2, 3), "gallery": torch.randn(5, 3), "k": 2, "distance": "l2", "backend": "torch"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        search(args.pop("query"), args.pop("gallery"), **args)


def test_faiss_matches_torch_on_exactly_tied_near_duplicates() -> None:
    """Near-duplicates whose exact distances tie: both backends give the same distances and break the tie by
    gallery index (the FAISS re-ranking recomputes near-coincident pairs from their difference, as torch does)."""
    gen = torch.Generator().manual_seed(0)
    ulp = 2.0**-14  # the float32 spacing of values in [512, 1024)
    for _ in range(20):
        q = 512 + 400 * torch.rand(1, 64, generator=gen)
        offsets = torch.zeros(8, 64)
        for i in range(8):  # the same multiset of ulp steps in other coordinates: exactly equal distances
            offsets[i, torch.randperm(64, generator=gen)[:4]] = torch.tensor([3.0, -2.0, 5.0, 1.0])
        g = torch.cat([q + offsets * ulp, 500 * torch.randn(100, 64, generator=gen)])
        dt, it = search(q, g, 6, backend="torch")
        df, i_f = search(q, g, 6, backend="faiss")
        assert it.tolist() == [[0, 1, 2, 3, 4, 5]]
        assert torch.equal(i_f, it) and torch.equal(df, dt)


def test_auto_backend_switch_counts_the_faiss_gpu_candidates() -> None:
    """auto leaves FAISS-GPU exactly when its candidate count would pass the 2,048 limit (self-match included)."""
    from fct_lightning.retrieval.neighbors import FAISS_GPU_MAX_K, _faiss_candidates

    assert _faiss_candidates(10_000, 1024, exclude_self=False) == FAISS_GPU_MAX_K
    assert _faiss_candidates(10_000, 1024, exclude_self=True) == FAISS_GPU_MAX_K + 1  # was let through
    assert _faiss_candidates(100, 1024, exclude_self=True) == 100
