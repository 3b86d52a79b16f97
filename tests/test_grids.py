"""Retrieval grids: fixed queries, their top-k against brute force, the drawn file and the W&B table."""

from __future__ import annotations

import pytest
import torch

from fct_lightning.grids import build_grid, collect_images, draw_grid, grid_queries, top_hits
from fct_lightning.loggers import grid_table


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


def _split():
    labels = torch.arange(3).repeat_interleave(4)
    embs = {"old": torch.randn(12, 5), "new": torch.nn.functional.one_hot(labels, 3).float()}
    images = torch.rand(12, 1, 8, 8)
    loader = [(images[:7], labels[:7], torch.arange(7)), (images[7:], labels[7:], torch.arange(7, 12))]
    return embs, labels, images, loader


def test_the_grid_is_drawn_for_the_evaluated_cases(tmp_path):
    embs, labels, images, loader = _split()
    assert set(collect_images(loader, {0, 11})) == {0, 11}
    cases = {"new/new": ("new", "new"), "old/old": ("old", "old"), "fct+side/old": ("new", "fct+side")}
    grid = build_grid(embs, labels, cases, loader, queries=2, k=3)
    assert list(grid.hits) == ["old/old", "new/new"]  # fct+side is not embedded; GRID_CASES' order
    assert grid.queries == [0, 4] and grid.k == 3
    assert torch.equal(grid.hits["new/new"][0], torch.tensor([1, 2, 3]))  # one-hot: its own class first, by row
    assert set(grid.images) >= {0, 4, *grid.hits["old/old"].flatten().tolist()}
    path = draw_grid(grid, tmp_path / "grid.png", "title")
    assert path.stat().st_size > 1000
    assert build_grid(embs, labels, {"bct/old": ("bct", "old")}, loader) is None


def test_an_extra_case_follows_the_registry_cases_with_its_own_embeddings(tmp_path):
    embs, labels, _, loader = _split()
    flipped = embs["new"].flip(0)  # row r of the extra gallery is item 11 - r
    grid = build_grid(embs, labels, {"new/new": ("new", "new")}, loader, queries=1, k=2,
                      extra={"new/fct+side, 10% backfilled (uncertainty)": (embs["new"], flipped)})
    assert list(grid.hits) == ["new/new", "new/fct+side, 10% backfilled (uncertainty)"]
    # query 0 (class 0) against the flipped gallery: rows 8..11 hold class 0's one-hot; row 0 is not left out
    assert grid.hits["new/fct+side, 10% backfilled (uncertainty)"][0].tolist() == [8, 9]
    assert draw_grid(grid, tmp_path / "g.png").is_file()
    only = build_grid(embs, labels, {}, loader, queries=1, k=2, extra={"x": (embs["old"], embs["old"])})
    assert list(only.hits) == ["x"]


def test_the_wandb_table_has_a_row_per_query_and_case_with_captioned_images():
    wandb = pytest.importorskip("wandb")
    embs, labels, _, loader = _split()
    grid = build_grid(embs, labels, {"old/old": ("old", "old"), "new/new": ("new", "new")}, loader, queries=2, k=3,
                      class_names=["zero", "one", "two"])
    table = grid_table(wandb, grid)
    assert table.columns == ["query", "class", "case", "top-1", "top-2", "top-3", "matches"]
    assert [(r[1], r[2]) for r in table.data] == [("zero", "old/old"), ("zero", "new/new"), ("one", "old/old"),
                                                  ("one", "new/new")]
    new_new = table.data[1]
    assert new_new[-1] == 3 and all(img._caption == "zero (match)" for img in new_new[3:6])
    old_old = table.data[0]
    hits = grid.hits["old/old"][0].tolist()
    assert old_old[-1] == sum(int(labels[h]) == 0 for h in hits)
    assert [img._caption.endswith("(match)") for img in old_old[3:6]] == [int(labels[h]) == 0 for h in hits]
    assert isinstance(new_new[0], wandb.Image) and new_new[0]._caption == "zero"


def test_the_backfilled_row_uses_fct_side_and_a_deterministic_deployable_policy():
    from fct_lightning.backfill import BackfillContext
    from fct_lightning.commands.evaluate import _backfilled_case

    labels = torch.arange(4).repeat_interleave(5)
    new = torch.randn(20, 3)
    ctx = BackfillContext(new + 1, new, labels, torch.arange(20.0))
    other = BackfillContext(new + 2, new, labels, None)
    for usable, policy in ((["random", "distance", "uncertainty"], "uncertainty"), (["distance", "random"], "random"),
                           (["distance"], "distance")):
        (name, (queries, gallery)), = _backfilled_case({"fct": (other, ["random"]), "fct+side": (ctx, usable)},
                                                      labels, 0.25).items()
        assert name == f"new/fct+side, 25% backfilled ({policy})" and queries is new
    (name, (_, gallery)), = _backfilled_case({"fct": (other, ["random"])}, labels, 0.5).items()
    assert name == "new/fct, 50% backfilled (random)" and (gallery == new).all(dim=1).sum() == 10
    assert _backfilled_case({"fct+side": (ctx, ["uncertainty"])}, labels, 0.0) == {}
    assert _backfilled_case({}, labels, 0.1) == {}
    assert _backfilled_case({"fct+side": (ctx, ["uncertainty"])}, labels.flip(0), 0.1) == {}  # other items: no row
