"""AC / AM on hand-written matrices, flips on a hand-made case, and the per-query evaluation behind them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fct_lightning.backfill import BackfillContext, backfill_curves
from fct_lightning.retrieval import evaluate
from fct_lightning.retrieval.compat import ac, am, compatibility_matrix, flips, top1_correct, write_heatmap
from fct_lightning.retrieval.evaluate import evaluate_queries

NAN = math.nan


def test_ac_am_on_a_hand_written_3x3_matrix():
    m = [[0.50, NAN, NAN],
         [0.55, 0.60, NAN],
         [0.45, 0.65, 0.70]]
    # pairs i > j: (1,0) 0.55 > 0.50 yes; (2,0) 0.45 > 0.50 no; (2,1) 0.65 > 0.60 yes
    assert ac(m) == pytest.approx(2 / 3)
    assert am(m) == pytest.approx((0.50 + 0.55 + 0.60 + 0.45 + 0.65 + 0.70) / 6)
    # ties do not meet the criterion (strictly greater); the upper triangle is ignored
    assert ac([[0.5, 0.9], [0.5, 0.6]]) == 0.0
    assert am([[0.5, 123.0], [0.5, 0.6]]) == pytest.approx(1.6 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        ac([[0.3]])
    with pytest.raises(ValueError, match="square"):
        am([[0.1, 0.2]])
    with pytest.raises(ValueError, match="finite"):
        am([[NAN, NAN], [0.1, 0.2]])


def test_flips_on_a_hand_made_case():
    before = torch.tensor([True, True, True, False, False])
    after = torch.tensor([True, False, False, True, False])
    assert flips(before, after) == (pytest.approx(2 / 5), pytest.approx(1 / 5))
    neg, pos = flips(before, torch.stack([before, after, ~before]))
    assert neg == pytest.approx([0.0, 0.4, 0.6]) and pos == pytest.approx([0.0, 0.2, 0.4])
    with pytest.raises(ValueError, match="same queries"):
        flips(before, after[:3])


def test_per_query_results_summarise_to_evaluate_and_give_top1_correctness():
    # items 0, 1 (label 0) and 2, 3 (label 1) on a line; nearest other item: 0 -> 1 (right), 1 -> 2 (wrong),
    # 2 -> 1 (wrong), 3 -> 2 (right)
    x = torch.tensor([[0.0], [1.0], [1.6], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    per = evaluate_queries(x, labels, x, labels, exclude_self=True)
    assert top1_correct(per).tolist() == [True, False, False, True]
    rng = np.random.default_rng(0)
    q, g = torch.as_tensor(rng.normal(size=(40, 4))), torch.as_tensor(rng.normal(size=(40, 4)))
    lab = torch.as_tensor(rng.integers(0, 4, 40))
    from fct_lightning.retrieval import summarize
    assert summarize(evaluate_queries(q, lab, g, lab, exclude_self=True)) == evaluate(q, lab, g, lab,
                                                                                       exclude_self=True)


def test_compatibility_matrix_of_embeddings(tmp_path):
    x = torch.tensor([[0.0], [1.0], [1.6], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    m = compatibility_matrix([x, perfect], [x, perfect], labels)
    assert m[0, 0] == 0.5 and m[1, 1] == 1.0 and math.isnan(m[0, 1])
    assert m[1, 0] == evaluate(perfect, labels, x, labels, exclude_self=True)["top1"]
    assert not math.isnan(compatibility_matrix([x, perfect], [x, perfect], labels, full=True)[0, 1])
    path = write_heatmap({"a": m, "b": m}, ["old", "new"], tmp_path / "c.png")
    assert path.is_file() and path.stat().st_size > 0


def test_backfilling_curves_carry_flips_per_point():
    rng = np.random.default_rng(1)
    n = 30
    labels = torch.as_tensor(rng.integers(0, 3, n))
    new = torch.as_tensor(rng.normal(size=(n, 3))) + 3 * torch.nn.functional.one_hot(labels, 3)
    transformed = torch.as_tensor(rng.normal(size=(n, 3)))
    reference = top1_correct(evaluate_queries(transformed, labels, transformed, labels, exclude_self=True))
    ctx = BackfillContext(transformed.float(), new.float(), labels)
    with_flips = backfill_curves(ctx, ["random"], seeds=(0,), points=4, reference_correct=reference)["random"]
    plain = backfill_curves(ctx, ["random"], seeds=(0,), points=4)["random"]
    assert with_flips["curves"] == plain["curves"] and "flips" not in plain
    f = with_flips["flips"]
    assert len(f["neg_flip"]) == len(f["pos_flip"]) == 4
    # at 0 % backfilled the gallery is `transformed`, whose queries are the new model's: compare by hand
    start = top1_correct(evaluate_queries(new.float(), labels, transformed.float(), labels, exclude_self=True))
    assert (f["neg_flip"][0], f["pos_flip"][0]) == pytest.approx(flips(reference, start))
    end = top1_correct(evaluate_queries(new.float(), labels, new.float(), labels, exclude_self=True))
    assert (f["neg_flip"][-1], f["pos_flip"][-1]) == pytest.approx(flips(reference, end))
