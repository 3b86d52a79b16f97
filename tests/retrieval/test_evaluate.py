"""evaluate(): backends, chunking, cosine, query/gallery sets, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fct_lightning.retrieval import evaluate, evaluate_mixtures


@pytest.fixture
def clustered() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (400,), generator=gen)
    centers = torch.randn(12, 24, generator=gen)
    return centers[labels] + 1.2 * torch.randn(400, 24, generator=gen), labels


def test_keys_and_ranges(clustered) -> None:
    x, y = clustered
    r = evaluate(x, y, x, y, exclude_self=True, ks=(1, 5, 10))
    assert list(r) == ["top1", "top5", "top10", "map", "map@r"]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in r.values())
    assert r["top1"] <= r["top5"] <= r["top10"]
    assert "map@r" not in evaluate(x, y, x, y, exclude_self=True, map_at_r=False)


def test_chunk_sizes_identical(clustered) -> None:
    x, y = clustered
    ref = evaluate(x, y, x, y, exclude_self=True)
    assert evaluate(x, y, x, y, exclude_self=True, chunk_size=1) == ref
    assert evaluate(x, y, x, y, exclude_self=True, chunk_size=7) == ref


@pytest.mark.parametrize("exclude_self", [True, False])
def test_faiss_and_torch_agree(clustered, exclude_self: bool) -> None:
    pytest.importorskip("faiss")
    x, y = clustered
    gen = torch.Generator().manual_seed(1)
    q = x + 0.3 * torch.randn(x.shape, generator=gen)  # cross-model: query embeddings differ from gallery
    a = evaluate(q, y, x, y, exclude_self=exclude_self, backend="torch")
    b = evaluate(q, y, x, y, exclude_self=exclude_self, backend="faiss", chunk_size=50)
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6, key


def test_query_set_different_from_gallery(clustered) -> None:
    x, y = clustered
    q, qy, g, gy = x[:50], y[:50], x[50:], y[50:]
    r = evaluate(q.numpy(), qy.numpy(), g.numpy(), gy.numpy(), exclude_self=False)
    assert r == evaluate(q, qy, g, gy, exclude_self=False)
    assert r["top1"] > 0.3


def test_cosine_equals_l2_on_normalised(clustered) -> None:
    x, y = clustered
    a = evaluate(x * 5.0, y, x, y, exclude_self=True, distance="cosine")
    b = evaluate(F.normalize(x * 5.0, p=2, dim=1), y, F.normalize(x, p=2, dim=1), y, exclude_self=True)
    assert a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(clustered) -> None:
    x, y = clustered
    gpu = evaluate(x.cuda(), y.cuda(), x.cuda(), y.cuda(), exclude_self=True, ks=(1, 5, 50))
    cpu = evaluate(x, y, x, y, exclude_self=True, ks=(1, 5, 50))
    for key in cpu:  # same ranking; only float64 summation order inside a query may differ (~1e-16)
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-12), key


def _call(**overrides):
    args = {"query": torch.randn(4, 3), "query_labels": torch.tensor([0, 1, 0, 1]), "gallery": torch.randn(4, 3),
            "gallery_labels": torch.tensor([0, 1, 1, 0]), "exclude_self": True}
    args.update(overrides)
    return evaluate(args.pop("query"), args.pop("query_labels"), args.pop("gallery"), args.pop("gallery_labels"),
                    **args)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"gallery": torch.randn(4, 5)}, r"query has dimension d=3 \(shape \(4, 3\)\) but gallery has d=5"),
        ({"query_labels": torch.tensor([0, 1])}, r"query_labels has 2 labels but query has 4 rows"),
        ({"gallery_labels": torch.tensor([0])}, r"gallery_labels has 1 labels but gallery has 4 rows"),
        ({"gallery": torch.randn(6, 3), "gallery_labels": torch.zeros(6, dtype=torch.long)},
         r"exclude_self=True needs len\(query\) == len\(gallery\).*got 4 and 6"),
        ({"query": torch.empty(0, 3), "query_labels": torch.empty(0, dtype=torch.long)}, r"query is empty"),
        ({"gallery": torch.tensor([[0.0, 1, 2], [float("nan"), 0, 0], [0, 0, 0], [1, 1, 1]])},
         r"gallery has non-finite values .* in 1 of 4 rows"),
        ({"query": torch.randn(4)}, r"query must be a 2-D array"),
        ({"distance": "manhattan"}, r"distance='manhattan'.*allowed values: 'l2', 'cosine'"),
        ({"backend": "gpu"}, r"backend='gpu'.*allowed values"),
        ({"ks": (0,)}, r"ks=\(0,\) must be a non-empty sequence of positive integers"),
        ({"chunk_size": 0}, r"chunk_size=0 must be a positive integer"),
        ({"query_labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, r"query_labels must hold integer class labels"),
    ],
)
def test_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_numpy_and_list_labels() -> None:
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    r = evaluate(x, [0, 1] * 5, x, np.array([0, 1] * 5), exclude_self=True)
    assert set(r) == {"top1", "top5", "map", "map@r"}


# ----------------------------------------------------------------------------- evaluate_mixtures
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize(("classes", "exclude_self"), [(3, True), (40, True), (40, False)])
def test_mixtures_equal_each_mixed_gallery(distance: str, classes: int, exclude_self: bool) -> None:
    """Every mixed gallery's metrics equal evaluate() of that gallery built by hand (dense and sparse paths,
    several chunks, duplicate embeddings for ties, queries other than the gallery)."""
    gen = torch.Generator().manual_seed(classes)
    n, d = 150, 6
    labels = torch.randint(0, classes, (n,), generator=gen)
    a = torch.randn(classes, d, generator=gen)[labels] + torch.randn(n, d, generator=gen)
    b = a + 0.7 * torch.randn(n, d, generator=gen)
    b[:10] = a[:10]  # items whose two embeddings coincide
    a[20:25] = a[30]  # exact ties inside one gallery
    q = b if exclude_self else b[:60] + 0.2
    ql = labels if exclude_self else labels[:60]
    masks = torch.rand(5, n, generator=gen) < torch.tensor([[0.0], [0.2], [0.5], [0.9], [1.0]])
    got = evaluate_mixtures(q, ql, a, b, labels, masks, exclude_self=exclude_self, distance=distance, chunk_size=23)
    assert len(got) == 5
    for row, r in zip(masks, got, strict=True):
        mixed = torch.where(row.unsqueeze(1), b, a)
        assert r == evaluate(q, ql, mixed, labels, exclude_self=exclude_self, distance=distance), row.float().mean()
    assert got[0] != got[-1]


def test_mixtures_reject_bad_masks_and_galleries(clustered) -> None:
    x, y = clustered
    with pytest.raises(ValueError, match="masks must be a boolean"):
        evaluate_mixtures(x, y, x, x, y, torch.zeros(2, len(x)), exclude_self=True)
    with pytest.raises(ValueError, match="masks must be a boolean"):
        evaluate_mixtures(x, y, x, x, y, torch.zeros(2, len(x) - 1, dtype=torch.bool), exclude_self=True)
    with pytest.raises(ValueError, match="same items"):
        evaluate_mixtures(x, y, x, x[:-1], y, torch.zeros(2, len(x), dtype=torch.bool), exclude_self=True)
    assert evaluate_mixtures(x, y, x, x, y, torch.zeros(0, len(x), dtype=torch.bool), exclude_self=True) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixtures_cuda_match_cpu(clustered) -> None:
    x, y = clustered
    b = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    masks = torch.rand(4, len(x), generator=torch.Generator().manual_seed(2)) < 0.5
    cpu = evaluate_mixtures(b, y, x, b, y, masks, exclude_self=True)
    gpu = evaluate_mixtures(b.cuda(), y.cuda(), x.cuda(), b.cuda(), y.cuda(), masks.cuda(), exclude_self=True)
    for c, g in zip(cpu, gpu, strict=True):
        assert g == pytest.approx(c, abs=1e-12)
