"""Retrieval grids: fixed queries, their top-k against brute force, and the drawn file."""

from __future__ import annotations

import torch

from fct_lightning.grids import collect_images, grid_queries, retrieval_grid, top_hits


def test_fixed_queries_are_the_first_item_of_each_class():
    labels = torch.tensor([3, 1, 1, 0, 3, 2, 0])
    assert grid_queries(labels, 3) == [3, 1, 5]  # classes 0, 1, 2
    assert grid_queries(labels, 10) == [3, 1, 5, 0]


def test_top_hits_leave_the_query_out_and_break_ties_by_row():
    gallery = torch.tensor([[0.0], [1.0], [1.0], [3.0], [0.0]])
    hits = top_hits(gallery, gallery, [0, 1], k=3)
    assert hits.tolist() == [[4, 1, 2], [2, 0, 4]]  # row 0: itself left out; row 1: rows 0 and 4 tie, 0 first
    assert top_hits(gallery, gallery, [0], k=2, exclude_self=False).tolist() == [[0, 4]]
    g = torch.randn(30, 4)
    q = torch.randn(30, 4)
    want = torch.cdist(q[[5, 7]].double(), g.double())
    want[0, 5] = want[1, 7] = float("inf")
    assert torch.equal(top_hits(q, g, [5, 7], k=4), want.argsort(dim=1, stable=True)[:, :4])


def test_the_grid_is_drawn_for_the_evaluated_cases(tmp_path):
    labels = torch.arange(3).repeat_interleave(4)
    embs = {"old": torch.randn(12, 5), "new": torch.nn.functional.one_hot(labels, 3).float()}
    images = torch.rand(12, 1, 8, 8)
    loader = [(images[:7], labels[:7], torch.arange(7)), (images[7:], labels[7:], torch.arange(7, 12))]
    assert set(collect_images(loader, {0, 11})) == {0, 11}
    cases = {"old/old": ("old", "old"), "new/new": ("new", "new"), "fct+side/old": ("new", "fct+side")}
    path = retrieval_grid(embs, labels, cases, loader, tmp_path / "grid.png", queries=2, k=3)
    assert path is not None and path.stat().st_size > 1000  # fct+side is not embedded: two cases drawn
    assert retrieval_grid(embs, labels, {"bct/old": ("bct", "old")}, loader, tmp_path / "none.png") is None
