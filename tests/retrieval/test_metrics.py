"""Metric kernel: hand-computed cases, scikit-learn AP and a naive loop written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fct_lightning.retrieval import evaluate
from fct_lightning.retrieval.metrics import build_class_index, query_metrics


def naive_metrics(dist: np.ndarray, ql: np.ndarray, gl: np.ndarray, exclude_self: bool, ks=(1, 5)) -> dict:
    """Per-query loop from the definitions: rank by (distance, index), AP over full ranking, mAP@R, CMC."""
    hits = {k: 0 for k in ks}
    aps, apr = [], []
    for i in range(dist.shape[0]):
        items = [j for j in range(dist.shape[1]) if not (exclude_self and j == i)]
        order = sorted(items, key=lambda j: (dist[i, j], j))
        rel = [gl[j] == ql[i] for j in order]
        r = sum(rel)
        for k in ks:
            hits[k] += any(rel[:k])
        if r == 0:
            continue
        found, ap, ap_r = 0, 0.0, 0.0
        for n, is_rel in enumerate(rel, start=1):
            if is_rel:
                found += 1
                ap += found / n
                if n <= r:
                    ap_r += found / n
        aps.append(ap / r)
        apr.append(ap_r / r)
    out = {f"top{k}": hits[k] / dist.shape[0] for k in ks}
    out["map"] = float(np.mean(aps)) if aps else 0.0
    out["map@r"] = float(np.mean(apr)) if apr else 0.0
    return out


def sq_dists(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return ((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1)


def test_hand_computed_ties_broken_by_index() -> None:
    # 1-D points. Query 0 at 0; gallery at distances 1,1,1,2 with labels [b, a, a, b] (ties among first three).
    q = np.array([[0.0]], dtype=np.float32)
    g = np.array([[1.0], [-1.0], [1.0], [2.0]], dtype=np.float32)
    r = evaluate(q, np.array([0]), g, np.array([1, 0, 0, 1]), exclude_self=False, ks=(1, 2, 10))
    # ranking by (distance, index): 0 (b), 1 (a), 2 (a), 3 (b): relevant at ranks 2 and 3.
    assert r["top1"] == 0.0 and r["top2"] == 1.0 and r["top10"] == 1.0
    assert r["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["map@r"] == pytest.approx((0 + 1 / 2) / 2)  # R = 2: only rank 2 counts


def test_colocated_items_with_different_labels() -> None:
    # Two gallery items at the same point; the lower index wins the tie whichever label it has.
    q = np.zeros((2, 2), dtype=np.float32)
    g = np.array([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    r = evaluate(q, np.array([7, 8]), g, np.array([8, 7, 8]), exclude_self=False)
    # query label 7: ranks 2 -> AP 1/2; query label 8: ranks 1, 3 -> AP (1 + 2/3)/2
    assert r["top1"] == 0.5 and r["top5"] == 1.0
    assert r["map"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2)
    assert r["map@r"] == pytest.approx((0.0 + 0.5) / 2)


def test_singleton_class_and_k_beyond_gallery() -> None:
    x = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 2])  # item 3 is a singleton: no relevant item once itself is removed
    r = evaluate(x, labels, x, labels, exclude_self=True, ks=(1, 100))
    # item0 -> item1 rank1; item1 -> item0 rank1; item2 label 1 alone too -> no relevant; item3 singleton.
    assert r["top1"] == 0.5 and r["top100"] == 0.5
    assert r["map"] == 1.0 and r["map@r"] == 1.0


def test_no_query_has_relevant_item() -> None:
    r = evaluate(np.eye(3, dtype=np.float32), [0, 1, 2], np.eye(3, dtype=np.float32), [5, 6, 7],
                 exclude_self=False)
    assert r == {"top1": 0.0, "top5": 0.0, "map": 0.0, "map@r": 0.0}


def test_self_excluded_even_when_embeddings_differ() -> None:
    q = np.array([[0.0], [10.0]], dtype=np.float32)
    g = np.array([[9.0], [0.5]], dtype=np.float32)  # gallery 1 is closest to query 0 but differs in label
    r = evaluate(q, [0, 1], g, [0, 1], exclude_self=True, ks=(1,))
    # with self excluded, each query only sees the other item, which has the other label
    assert r["top1"] == 0.0 and r["map"] == 0.0


def test_per_query_ap_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(40, 8)).astype(np.float32)
    g = rng.normal(size=(300, 8)).astype(np.float32)
    ql, gl = rng.integers(0, 5, 40), rng.integers(0, 5, 300)
    d = torch.from_numpy(sq_dists(q, g).astype(np.float32))
    m = query_metrics(d.clone(), torch.from_numpy(ql), build_class_index(torch.from_numpy(gl)))
    for i in range(40):
        expected = average_precision_score(gl == ql[i], -d[i].numpy())
        assert float(m.ap[i]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_matches_naive_loop(exclude_self: bool) -> None:
    rng = np.random.default_rng(1)
    n = 120
    q = rng.normal(size=(n, 6)).astype(np.float32)
    g = rng.normal(size=(n, 6)).astype(np.float32)
    ql, gl = rng.integers(0, 7, n), rng.integers(0, 7, n)
    if exclude_self:
        gl = ql
    gl[3] = 99  # a gallery-only class
    expected = naive_metrics(sq_dists(q, g), ql, gl, exclude_self)
    got = evaluate(q, ql, g, gl, exclude_self=exclude_self)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_many_exact_ties_match_naive_loop() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, size=(60, 2)).astype(np.float32)  # heavy duplication -> many exact ties
    labels = rng.integers(0, 4, 60)
    expected = naive_metrics(sq_dists(x, x), labels, labels, True, ks=(1, 5, 30))
    got = evaluate(x, labels, x, labels, exclude_self=True, ks=(1, 5, 30), chunk_size=7)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("exclude_self", [True, False])
def test_dense_and_sparse_kernels_agree(exclude_self: bool) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(90, 3)).astype(np.float32)  # exact ties too
    labels = torch.from_numpy(rng.integers(0, 3, 90))
    labels[5] = 50  # singleton
    d = torch.from_numpy(sq_dists(x, x).astype(np.float32))
    self_index = torch.arange(90) if exclude_self else None
    a = query_metrics(d, labels, build_class_index(labels), self_index, dense=True)
    b = query_metrics(d, labels, build_class_index(labels), self_index, dense=False)
    assert torch.equal(a.first_rank, b.first_rank) and torch.equal(a.num_relevant, b.num_relevant)
    assert torch.equal(a.ap, b.ap) and torch.equal(a.ap_at_r, b.ap_at_r)  # one formula on the same ranks
    expected = naive_metrics(sq_dists(x, x), labels.numpy(), labels.numpy(), exclude_self)
    assert float(a.ap[a.num_relevant > 0].mean()) == pytest.approx(expected["map"], abs=1e-12)
