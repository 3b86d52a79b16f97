"""Metrics through a FAISS index (retrieval/ann.py): Flat equals the exact path bit for bit, approximate indexes stay
consistent, metrics_from_hits on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fct_lightning.retrieval import ann, evaluate

pytest.importorskip("faiss")


def _clustered(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gallery embeddings around class centres, labels, and cross-model queries (the gallery plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=gen)
    x = torch.randn(classes, d, generator=gen)[labels] + torch.randn(n, d, generator=gen)
    return x, labels, x + 0.3 * torch.randn(n, d, generator=gen)


def _exact(q, ql, g, gl, **kw) -> dict[str, float]:
    out = evaluate(q, ql, g, gl, **kw)
    del out["map"]
    return out


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_flat_equals_exact(distance: str, exclude_self: bool) -> None:
    x, y, q = _clustered(600, 16, 8)
    kw = dict(distance=distance, exclude_self=exclude_self, ks=(1, 5, 10))
    assert ann.evaluate_index(q, y, x, y, **kw) == _exact(q, y, x, y, **kw)


@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_a_gallery_smaller_than_the_cut_off_counts_every_item(n: int, exclude_self: bool, factory: str) -> None:
    """Fewer gallery items than top-5 needs: the exact path ranks the whole gallery; the index path stopped with
    'ks=(1, 5) needs at least 5 hits' (a validation split of four images did)."""
    x, y, q = _clustered(n, 4, 2)
    kw = dict(exclude_self=exclude_self, ks=(1, 5))
    assert ann.evaluate_index(q, y, x, y, factory=factory, **kw) == _exact(q, y, x, y, **kw)


def test_flat_reranking_is_what_makes_it_exact() -> None:
    """On this data FAISS's float32 distances order some near ties differently from the canonical ones: the hits
    taken as FAISS returns them miss the exact mAP@R, the re-ranked ones do not (so the test above can fail)."""
    x, y, q = _clustered(2000, 32, 10)
    self_index = torch.arange(len(y))
    k = ann.default_k(y, (1, 5), exclude_self=True)
    dists, ids = ann.search(ann.build_index(x, "Flat"), q, k + 1)
    raw = ann.metrics_from_hits(ann._sorted_hits(dists, ids, self_index, k), None, y, y, self_index=self_index)
    exact = _exact(q, y, x, y, exclude_self=True)
    assert raw["map@r"] != exact["map@r"]
    assert ann.evaluate_index(q, y, x, y, exclude_self=True) == exact


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_flat_equals_exact_with_ties(distance: str, exclude_self: bool) -> None:
    """Every embedding is one of 40 rows: each ranking is groups of exactly tied items, broken by gallery index."""
    x, y, q = _clustered(500, 8, 5)
    gen = torch.Generator().manual_seed(3)
    g, qq = x[torch.randint(40, (500,), generator=gen)], q[torch.randint(40, (500,), generator=gen)]
    for query in (g, qq):  # same-model (self at distance 0, among its duplicates) and cross-model queries
        kw = dict(distance=distance, exclude_self=exclude_self)
        assert ann.evaluate_index(query, y, g, y, **kw) == _exact(query, y, g, y, **kw)


def test_large_offset_falls_back_to_exact_ranking() -> None:
    """Far from the origin FAISS's float32 error bound exceeds the gaps between neighbours: the queries it cannot
    certify are ranked against the whole gallery, and the result is still exact."""
    x, y, q = _clustered(300, 8, 4)
    off = torch.full((8,), 300.0)
    assert ann.evaluate_index(q + off, y, x + off, y, exclude_self=True) == _exact(q + off, y, x + off, y,
                                                                                   exclude_self=True)


def test_exclude_self_drops_the_query_by_index_not_by_distance() -> None:
    """Items 0 and 1 are identical; under leave-one-out item 0's first hit is item 1 (distance 0), not nothing."""
    g = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 6.0]])
    y = torch.tensor([0, 0, 1, 2])
    r = ann.evaluate_index(g, y, g, y, exclude_self=True, ks=(1,))
    # item 0 -> 1 (hit), 1 -> 0 (hit), 2 -> 3 (miss), 3 -> 2 (miss); items 2 and 3 have no other member: R = 0
    assert r == {"top1": 0.5, "map@r": 1.0} == _exact(g, y, g, y, exclude_self=True, ks=(1,))
    # cross-model: the query's own item is far away, yet it is still the one removed
    q = g + torch.tensor([[9.0, 9.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert ann.evaluate_index(q, y, g, y, exclude_self=True, ks=(1,)) == _exact(q, y, g, y, exclude_self=True, ks=(1,))


def test_ivf_is_consistent_with_flat() -> None:
    x, y, q = _clustered(1000, 16, 10)
    exact = _exact(q, y, x, y, exclude_self=True)
    every_list = ann.evaluate_index(q, y, x, y, factory="IVF8,Flat", nprobe=8, exclude_self=True)
    for key, value in exact.items():  # all lists visited: the same neighbours; FAISS's float32 order of near ties
        assert abs(every_list[key] - value) <= 2 / len(y), key  # may swap a few hits
    one_list = ann.evaluate_index(q, y, x, y, factory="IVF8,Flat", nprobe=1, exclude_self=True)
    assert set(one_list) == set(exact) and all(0.0 <= v <= 1.0 for v in one_list.values())
    # recall of the exact top-10 through one inverted list out of 8: partial, not zero
    index = ann.build_index(x, "IVF8,Flat", nprobe=1)
    _, approx = ann.search(index, q, 10)
    _, flat = ann.search(ann.build_index(x, "Flat"), q, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, flat, strict=True)) / flat.numel()
    assert 0.3 < recall < 1.0
    sampled = ann.evaluate_index(q, y, x, y, factory="IVF8,Flat", nprobe=8, exclude_self=True, train_rows=200)
    assert sampled == every_list  # nprobe = nlist: whatever the training sample, every item is scanned


def test_hnsw_search_parameters_reach_faiss_and_widen_the_search() -> None:
    import faiss

    x, y, q = _clustered(2000, 16, 10)
    _, flat = ann.search(ann.build_index(x, "Flat"), q, 10)

    def recall(index) -> float:
        _, got = ann.search(index, q, 10)
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, flat, strict=True)) / flat.numel()

    narrow = ann.build_index(x, "HNSW4", search_params="efSearch=1")
    wide = ann.build_index(x, "HNSW4", search_params="efSearch=256")
    assert faiss.downcast_index(narrow).hnsw.efSearch == 1 and faiss.downcast_index(wide).hnsw.efSearch == 256
    assert recall(narrow) < recall(wide) and recall(wide) > 0.95
    ann.set_search_parameters(narrow, {"efSearch": 256})
    assert recall(narrow) == recall(wide)
    # several parameters at once, one of them on the IVF's HNSW quantizer
    nested = ann.build_index(x, "IVF8_HNSW4,Flat", search_params="nprobe=8, quantizer_efSearch=40")
    ivf = faiss.extract_index_ivf(nested)
    assert ivf.nprobe == 8 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 40
    wide_metrics = ann.evaluate_index(q, y, x, y, factory="HNSW4", search_params="efSearch=256", exclude_self=True)
    assert wide_metrics != ann.evaluate_index(q, y, x, y, factory="HNSW4", search_params="efSearch=1",
                                              exclude_self=True)


@pytest.mark.parametrize(("params", "message"), [
    ("efSearch", "'efSearch' is not NAME=NUMBER"), ("efSearch=many", "'efSearch=many' is not NAME=NUMBER"),
    ("nprobe=4,", "'' is not NAME=NUMBER"), ("nprobe=4", "nprobe=4 does not apply to this IndexHNSWFlat index"),
])
def test_bad_search_parameters_say_what_to_give(params, message) -> None:
    x, _, _ = _clustered(200, 8, 3)
    with pytest.raises(ValueError, match=message):
        ann.build_index(x, "HNSW4", search_params=params)


def test_bad_options_name_the_argument() -> None:
    x, y, q = _clustered(50, 8, 3)
    with pytest.raises(ValueError, match="index='NoSuchIndex' is not a FAISS factory"):
        ann.evaluate_index(q, y, x, y, factory="NoSuchIndex")
    with pytest.raises(ValueError, match="nprobe=4 needs an IVF index"):
        ann.evaluate_index(q, y, x, y, factory="Flat", nprobe=4)
    with pytest.raises(ValueError, match="could not be trained on 50 rows"):
        ann.evaluate_index(q, y, x, y, factory="IVF256,Flat")
    with pytest.raises(ValueError, match=r"k=3 must be an integer >= max\(ks\)=5"):
        ann.evaluate_index(q, y, x, y, k=3)
    with pytest.raises(ValueError, match="distance='dot'"):
        ann.evaluate_index(q, y, x, y, distance="dot")


def test_small_k_makes_map_at_r_a_lower_bound() -> None:
    x, y, q = _clustered(300, 8, 3)  # R is about 100: 5 hits cannot see most relevant items
    exact = _exact(q, y, x, y, exclude_self=True)
    short = ann.evaluate_index(q, y, x, y, exclude_self=True, k=5)
    assert short["top1"] == exact["top1"] and short["top5"] == exact["top5"]
    assert short["map@r"] < exact["map@r"]


def test_metrics_from_hits_hand_computed() -> None:
    gl = torch.tensor([0, 0, 1, 1, 0])  # class 0: rows 0, 1, 4; class 1: rows 2, 3
    ids = torch.tensor([[2, 1, 4, 3],  # query of class 0: relevant at ranks 2, 3 -> R = 3
                        [3, 2, -1, -1],  # class 1: relevant at 1, 2 (FAISS padding after) -> R = 2
                        [2, 3, 0, 1]])  # class 2: no relevant gallery item -> miss, left out of mAP@R
    r = ann.metrics_from_hits(ids, None, torch.tensor([0, 1, 2]), gl, ks=(1, 2))
    # AP@R: query 0 = (0 + 1/2 + 2/3) / 3, query 1 = (1 + 1) / 2
    assert r["top1"] == pytest.approx(1 / 3) and r["top2"] == pytest.approx(2 / 3)
    assert r["map@r"] == pytest.approx(((1 / 2 + 2 / 3) / 3 + 1.0) / 2)


def test_metrics_from_hits_self_index_and_distances() -> None:
    gl = torch.tensor([0, 0, 1, 0])
    ids = torch.tensor([[0, 2, 1, 3]])  # query is gallery row 0: that hit goes, the rest move up
    r = ann.metrics_from_hits(ids, None, torch.tensor([0]), gl, self_index=torch.tensor([0]), ks=(1,))
    assert r == {"top1": 0.0, "map@r": pytest.approx((1 / 2) / 2)}  # R = 2 (rows 1, 3): ranks 2 and 3
    # equal distances are ordered by gallery row (row 1 before row 2), whatever order they came in
    tied = ann.metrics_from_hits(torch.tensor([[2, 1, 3]]), torch.tensor([[0.5, 0.5, 0.9]]), torch.tensor([0]), gl,
                                 ks=(1,))
    assert tied["top1"] == 1.0
    with pytest.raises(ValueError, match=r"hit_ids must hold gallery rows in \[0, 4\)"):
        ann.metrics_from_hits(torch.tensor([[7]]), None, torch.tensor([0]), gl, ks=(1,))
    with pytest.raises(ValueError, match="needs at least 5 hits per query"):
        ann.metrics_from_hits(ids, None, torch.tensor([0]), gl)


@pytest.mark.parametrize("factory", ["IVF4,Flat", "PCA8,IVF4,Flat", "IDMap"])
def test_set_nprobe_reaches_the_inverted_lists_inside_wrappers(factory) -> None:
    faiss = pytest.importorskip("faiss")
    x, _, _ = _clustered(400, 16, 4)
    if factory == "IDMap":
        index = faiss.IndexIDMap(faiss.index_factory(16, "IVF4,Flat"))
        index.train(x.numpy())
        index.add_with_ids(x.numpy(), np.arange(400, dtype=np.int64) * 7)
    else:
        index = ann.build_index(x, factory)
    ann.set_nprobe(index, 3)
    assert faiss.extract_index_ivf(index).nprobe == 3
    with pytest.raises(ValueError, match="nprobe 0 must be a positive integer"):
        ann.set_nprobe(index, 0)
    with pytest.raises(ValueError, match="nprobe=2 needs an IVF index; this one is a IndexFlat"):
        ann.set_nprobe(ann.build_index(x, "Flat"), 2)
