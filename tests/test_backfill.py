"""Partial backfilling: policy orders, curves, AUCs, the policy registry and the embedding pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fct_lightning.backfill import (
    METRICS,
    POLICIES,
    BackfillContext,
    BackfillPolicy,
    auc_mean,
    auc_trapz,
    backfill_count,
    backfill_curve,
    backfill_curves,
    backfill_masks,
    backfilled_gallery,
    check_order,
    embed_for_backfill,
    get_policy,
    misplaced,
    order_diagnostics,
    register_policy,
    transform_features,
)
from fct_lightning.models.transformation import Transformation
from fct_lightning.retrieval import evaluate


def _ctx(uncertainty=None) -> BackfillContext:
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    new = t + torch.tensor([[0.1, 0.0], [3.0, 0.0], [0.0, 1.0]])  # errors 0.1, 3.0, 1.0
    return BackfillContext(t, new, torch.tensor([0, 1, 0]), uncertainty)


@pytest.fixture(scope="module")
def synthetic() -> BackfillContext:
    """New embeddings in class clusters; transformed = new + per-item noise of scale s_i; uncertainty = log s_i^2."""
    gen = torch.Generator().manual_seed(0)
    n, d, c = 300, 8, 10
    labels = torch.randint(0, c, (n,), generator=gen)
    new = torch.randn(c, d, generator=gen)[labels] + 0.5 * torch.randn(n, d, generator=gen)
    s = torch.exp(torch.empty(n).uniform_(np.log(0.05), np.log(3.0), generator=gen))
    transformed = new + s[:, None] * torch.randn(n, d, generator=gen)
    return BackfillContext(transformed, new, labels, torch.log(s**2))


# ----------------------------------------------------------------------------- policies
def test_uncertainty_order_hand_made() -> None:
    assert get_policy("uncertainty").order(_ctx(torch.tensor([0.1, 0.9, 0.5])), 0).tolist() == [1, 2, 0]


def test_uncertainty_ties_keep_lower_index_first() -> None:
    assert get_policy("uncertainty").order(_ctx(torch.tensor([0.5, 0.9, 0.5])), 0).tolist() == [1, 0, 2]


def test_confident_order_is_least_uncertain_first_ties_by_index() -> None:
    policy = get_policy("confident")
    assert policy.order(_ctx(torch.tensor([0.1, 0.9, 0.5])), 0).tolist() == [0, 2, 1]
    assert policy.order(_ctx(torch.tensor([0.5, 0.9, 0.5])), 0).tolist() == [0, 2, 1]
    assert policy.needs_uncertainty and not policy.oracle and not policy.stochastic
    assert not get_policy("random").needs_uncertainty and not get_policy("distance").needs_uncertainty
    with pytest.raises(ValueError, match="policy 'confident' needs per-item uncertainty.*--model.uncertainty true"):
        policy.order(_ctx(), 0)


def test_distance_order_hand_made() -> None:
    policy = get_policy("distance")
    assert policy.order(_ctx(), 0).tolist() == [1, 2, 0]
    assert policy.oracle and not get_policy("uncertainty").oracle and not get_policy("random").oracle


def test_random_order_seeded_permutation() -> None:
    ctx = BackfillContext(torch.zeros(50, 2), torch.ones(50, 2), torch.zeros(50, dtype=torch.long))
    policy = get_policy("random")
    a, b, c = policy.order(ctx, 0), policy.order(ctx, 0), policy.order(ctx, 1)
    assert a.dtype == torch.int64 and sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uncertainty_policy_without_uncertainty_is_clear() -> None:
    with pytest.raises(ValueError, match="--model.uncertainty true"):
        get_policy("uncertainty").order(_ctx(), 0)
    with pytest.raises(ValueError, match="--model.uncertainty true"):
        backfill_curves(_ctx(), ["uncertainty"], points=2)


def test_unknown_policy_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"'nope' is not known.*'distance'.*'random'.*'uncertainty'"):
        get_policy("nope")
    with pytest.raises(ValueError, match="'nope'"):
        backfill_curves(_ctx(), ["random", "nope"], points=2)


def test_custom_policy_registration() -> None:
    class Reverse(BackfillPolicy):
        name = "test_reverse"

        def order(self, ctx: BackfillContext, seed: int) -> torch.Tensor:
            return torch.arange(ctx.n - 1, -1, -1)

    try:
        assert register_policy(Reverse) is Reverse and POLICIES["test_reverse"] is Reverse
        out = backfill_curves(_ctx(), ["test_reverse"], points=4)
        assert out["test_reverse"]["seeds"] == 1 and out["test_reverse"]["oracle"] is False
        with pytest.raises(ValueError, match="already registered"):
            register_policy(type("Other", (Reverse,), {}))
    finally:
        POLICIES.pop("test_reverse", None)
    with pytest.raises(ValueError, match="'name'"):
        register_policy(type("Nameless", (BackfillPolicy,), {}))


def test_bad_custom_order_is_rejected() -> None:
    class Bad(BackfillPolicy):
        name = "test_bad"

        def order(self, ctx: BackfillContext, seed: int) -> torch.Tensor:
            return torch.zeros(ctx.n, dtype=torch.long)

    POLICIES["test_bad"] = Bad
    try:
        with pytest.raises(ValueError, match="permutation"):
            backfill_curves(_ctx(), ["test_bad"], points=2)
    finally:
        POLICIES.pop("test_bad")
    with pytest.raises(ValueError, match="permutation"):
        check_order(torch.tensor([0.0, 1.0]), 2)


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        BackfillContext(torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="uncertainty"):
        BackfillContext(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(2))


# ----------------------------------------------------------------------------- AUC and counts
def test_auc_hand_computed() -> None:
    f, v = [0.0, 0.5, 1.0], [0.2, 0.6, 0.7]
    assert auc_mean(v) == pytest.approx(0.5)
    assert auc_trapz(f, v) == pytest.approx(0.25 * (0.2 + 0.6) + 0.25 * (0.6 + 0.7))  # 0.525
    assert auc_trapz([0.0, 0.25, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.125 + 0.75)
    assert auc_mean([0.3] * 22) == pytest.approx(0.3)
    assert auc_trapz(np.linspace(0, 1, 22), [0.3] * 22) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="increasing"):
        auc_trapz([1.0, 0.0], [0.0, 1.0])


def test_backfill_count_rounds_half_up() -> None:
    assert [backfill_count(f, 10) for f in (0.0, 0.05, 0.14, 0.15, 0.5, 1.0)] == [0, 1, 1, 2, 5, 10]
    assert backfill_count(1.0, 7) == 7 and all(backfill_count(f, 7) <= 7 for f in np.linspace(0, 1, 22))


# ----------------------------------------------------------------------------- curves
def test_curve_endpoints_match_cases(synthetic: BackfillContext) -> None:
    c = synthetic
    order = get_policy("random").order(c, 0)
    out = backfill_curve(c.gallery_new, c.labels, c.gallery_transformed, c.gallery_new, c.labels, order, points=5)
    assert out["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    fct = evaluate(c.gallery_new, c.labels, c.gallery_transformed, c.labels, exclude_self=True)
    new = evaluate(c.gallery_new, c.labels, c.gallery_new, c.labels, exclude_self=True)
    assert {m: out["curves"][m][0] for m in METRICS} == fct
    assert {m: out["curves"][m][-1] for m in METRICS} == new


def test_curve_intermediate_point_is_mixed_gallery(synthetic: BackfillContext) -> None:
    c = synthetic
    order = get_policy("uncertainty").order(c, 0)
    out = backfill_curve(c.gallery_new, c.labels, c.gallery_transformed, c.gallery_new, c.labels, order, points=3,
                         distance="cosine")
    mixed = c.gallery_transformed.clone()
    mixed[order[:150]] = c.gallery_new[order[:150]]
    ref = evaluate(c.gallery_new, c.labels, mixed, c.labels, exclude_self=True, distance="cosine")
    assert {m: out["curves"][m][1] for m in METRICS} == ref


def test_the_backfilled_gallery_is_the_state_the_curve_evaluates(synthetic: BackfillContext) -> None:
    c = synthetic
    order = get_policy("uncertainty").order(c, 0)
    got = backfilled_gallery(c, "uncertainty", 0.1)
    want = c.gallery_transformed.clone()
    want[order[:30]] = c.gallery_new[order[:30]]  # 10% of 300: the 30 most uncertain
    assert torch.equal(got, want)
    assert torch.equal(backfilled_gallery(c, "random", 0.5, seed=3)[get_policy("random").order(c, 3)[150:]],
                       c.gallery_transformed[get_policy("random").order(c, 3)[150:]])
    assert torch.equal(backfilled_gallery(c, "random", 0.0), c.gallery_transformed)
    assert torch.equal(backfilled_gallery(c, "random", 1.0), c.gallery_new)
    # the curve's point at 10% is this gallery's evaluation
    curve = backfill_curve(c.gallery_new, c.labels, c.gallery_transformed, c.gallery_new, c.labels, order, points=11)
    ref = evaluate(c.gallery_new, c.labels, got, c.labels, exclude_self=True)
    assert {m: curve["curves"][m][1] for m in METRICS} == pytest.approx(ref)
    with pytest.raises(ValueError, match=r"fraction=1.5 must be in \[0, 1\]"):
        backfilled_gallery(c, "random", 1.5)


def test_curves_layout_reproducible_and_random_averaged(synthetic: BackfillContext) -> None:
    c = synthetic
    out = backfill_curves(c, ["random", "uncertainty"], seeds=(0, 1), points=6)
    assert out == backfill_curves(c, ["random", "uncertainty"], seeds=(0, 1), points=6)
    json.loads(json.dumps(out))  # JSON-serialisable as is
    rnd = out["random"]
    assert set(rnd) == {"fractions", "curves", "auc_mean", "auc_trapz", "seeds", "oracle", "first"}
    assert rnd["seeds"] == 2 and out["uncertainty"]["seeds"] == 1 and rnd["fractions"] == np.linspace(0, 1, 6).tolist()
    runs = [backfill_curve(c.gallery_new, c.labels, c.gallery_transformed, c.gallery_new, c.labels,
                           get_policy("random").order(c, s), points=6) for s in (0, 1)]
    for m in METRICS:
        pairs = zip(runs[0]["curves"][m], runs[1]["curves"][m], strict=True)
        assert rnd["curves"][m] == pytest.approx([(a + b) / 2 for a, b in pairs])
        assert rnd["auc_mean"][m] == pytest.approx(np.mean(rnd["curves"][m]))
        assert rnd["auc_trapz"][m] == pytest.approx(auc_trapz(rnd["fractions"], rnd["curves"][m]))
    assert out["random"]["curves"] != backfill_curves(c, ["random"], seeds=(5,), points=6)["random"]["curves"]


def test_uncertainty_beats_random_and_oracle_beats_uncertainty(synthetic: BackfillContext) -> None:
    out = backfill_curves(synthetic, ["random", "uncertainty", "distance"], seeds=(0, 1, 2), points=6)
    for m in METRICS:  # top-1/top-5 are near-saturated here; the ranking metrics show the gap (~+5 points)
        rnd, unc, ora = (out[p]["auc_mean"][m] for p in ("random", "uncertainty", "distance"))
        assert unc > rnd + (0.02 if m.startswith("map") else -0.005), (m, unc, rnd)
        assert ora >= unc - 0.005, (m, ora, unc)
        assert out["uncertainty"]["auc_trapz"][m] > out["random"]["auc_trapz"][m] - 0.005
    assert out["distance"]["oracle"] is True


def test_separate_query_set(synthetic: BackfillContext) -> None:
    c = synthetic
    q, ql = c.gallery_new[:40] + 0.1, c.labels[:40]
    out = backfill_curves(c, ["distance"], query_new=q, query_labels=ql, points=2)
    ref = evaluate(q, ql, c.gallery_transformed, c.labels, exclude_self=False)
    assert {m: out["distance"]["curves"][m][0] for m in METRICS} == ref
    with pytest.raises(ValueError, match="together"):
        backfill_curves(c, ["distance"], query_new=q, points=2)


def test_argument_errors(synthetic: BackfillContext) -> None:
    with pytest.raises(ValueError, match="points"):
        backfill_curves(synthetic, ["random"], points=1)
    with pytest.raises(ValueError, match="seeds"):
        backfill_curves(synthetic, ["random"], seeds=())
    with pytest.raises(ValueError, match="policies"):
        backfill_curves(synthetic, "random")


# ----------------------------------------------------------------------------- embedding pass
class _FakeTransformationStage(nn.Module):
    """The parts of TransformationModel that the backfill pass uses, on tiny linear 'backbones'."""

    def __init__(self, uncertainty: bool, use_side_info: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.uncertainty, self.use_side_info = uncertainty, use_side_info
        self.old_net, self.side_net, self.new_net = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(6, 5)
        self.h = Transformation(4, 5, 3 if use_side_info else None, 2, 16, 1, uncertainty, uncertainty_dim=2)

    def frozen_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"old": self.old_net(images), "new": self.new_net(images)}
        if self.use_side_info:
            out["side"] = self.side_net(images)
        return out


def _loader(n: int = 11):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % 3
    perm = torch.tensor([3, 7, 0, 10, 1, 5, 9, 2, 8, 4, 6, 3])  # shuffled, with a padding duplicate (3)
    return x, y, [(x[perm[i:i + 4]], y[perm[i:i + 4]], perm[i:i + 4]) for i in range(0, len(perm), 4)]


@pytest.mark.parametrize("side", [True, False])
def test_embed_for_backfill_index_order(side: bool) -> None:
    module = _FakeTransformationStage(uncertainty=True, use_side_info=side).train()
    x, y, loader = _loader()
    emb = embed_for_backfill(module, loader, "cpu")
    assert module.training  # mode restored
    module.eval()
    with torch.no_grad():
        f = module.frozen_embeddings(x)
        pred, log_var = module.h.forward_with_uncertainty(f["old"], f.get("side"))
    torch.testing.assert_close(emb["transformed"], pred)
    torch.testing.assert_close(emb["new"], f["new"])
    torch.testing.assert_close(emb["uncertainty"], log_var.mean(dim=1))
    assert torch.equal(emb["labels"], y)
    ctx = BackfillContext.from_embeddings(emb)
    assert ctx.n == 11 and get_policy("uncertainty").order(ctx, 0).tolist() == torch.argsort(
        log_var.mean(dim=1), descending=True, stable=True).tolist()


def test_embed_without_uncertainty_head() -> None:
    module = _FakeTransformationStage(uncertainty=False)
    _, _, loader = _loader()
    emb = embed_for_backfill(module, loader, "cpu")
    assert emb["uncertainty"] is None and emb["transformed"].shape == (11, 5)
    with pytest.raises(ValueError, match="--model.uncertainty true"):
        get_policy("uncertainty").order(BackfillContext.from_embeddings(emb), 0)


def test_embed_missing_items_is_an_error() -> None:
    x, y, _ = _loader()
    with pytest.raises(ValueError, match="0..N-1"):
        embed_for_backfill(_FakeTransformationStage(True), [(x[:3], y[:3], torch.tensor([0, 1, 5]))], "cpu")


@pytest.mark.parametrize("side", [True, False])
def test_transform_features_equals_the_image_pass(side: bool) -> None:
    module = _FakeTransformationStage(uncertainty=True, use_side_info=side)
    x, y, loader = _loader()
    with torch.no_grad():
        f = module.frozen_embeddings(x)
    stored = transform_features(module, f["old"], f.get("side"), f["new"], y, batch_size=4)
    emb = embed_for_backfill(module, loader, "cpu")
    for key in ("transformed", "new", "uncertainty", "labels"):
        torch.testing.assert_close(stored[key], emb[key])


def test_transform_features_errors() -> None:
    module = _FakeTransformationStage(uncertainty=False)
    x, y, _ = _loader()
    f = module.frozen_embeddings(x)
    with pytest.raises(ValueError, match="pass the side-info features"):
        transform_features(module, f["old"], None, f["new"], y)
    with pytest.raises(ValueError, match="same items: old 11, new 10"):
        transform_features(module, f["old"], f["side"], f["new"][:10], y)


def test_curves_evaluate_the_two_end_points_once(synthetic: BackfillContext, monkeypatch) -> None:
    """All orders go through one pass; nothing and everything backfilled are evaluated once, with the same values."""
    import fct_lightning.backfill as bf

    calls = []
    real = bf.evaluate_mixtures
    monkeypatch.setattr(bf, "evaluate_mixtures", lambda *a, **k: calls.append(a[5].shape) or real(*a, **k))
    out = backfill_curves(synthetic, ["random", "distance"], seeds=(0, 1), points=4)
    # one call; three curves of four points share the two end points: 2 + 3 * 2 galleries
    assert calls == [torch.Size([2 + 3 * 2, synthetic.n])]
    for name, seed in (("random", 1), ("distance", 0)):
        order = get_policy(name).order(synthetic, seed)
        alone = backfill_curve(synthetic.gallery_new, synthetic.labels, synthetic.gallery_transformed,
                               synthetic.gallery_new, synthetic.labels, order, points=4)
        if name == "distance":
            assert out[name]["curves"] == alone["curves"]
        else:  # the random curve is the mean over seeds; its end points are each seed's
            for m in METRICS:
                assert out[name]["curves"][m][0] == alone["curves"][m][0]
                assert out[name]["curves"][m][-1] == alone["curves"][m][-1]


def test_every_point_is_the_mixed_gallery_evaluated_alone(synthetic: BackfillContext) -> None:
    """The one-pass curves equal evaluate() of each partly backfilled gallery, bit for bit, whatever the chunking."""
    c = synthetic
    order = get_policy("random").order(c, 3)
    out = backfill_curve(c.gallery_new, c.labels, c.gallery_transformed, c.gallery_new, c.labels, order, points=7,
                         chunk_size=37)
    for j, f in enumerate(out["fractions"]):
        mixed = c.gallery_transformed.clone()
        k = backfill_count(f, c.n)
        mixed[order[:k]] = c.gallery_new[order[:k]]
        ref = evaluate(c.gallery_new, c.labels, mixed, c.labels, exclude_self=True)
        assert {m: out["curves"][m][j] for m in METRICS} == ref, f


def test_backfill_masks() -> None:
    masks = backfill_masks(torch.tensor([2, 0, 1]), [0, 1, 2, 3])
    assert masks.tolist() == [[False, False, False], [False, False, True], [True, False, True], [True, True, True]]


def test_misplaced_items_and_what_an_order_backfills_first() -> None:
    # two classes on a line; item 2's transformed embedding lies among class 1's new embeddings
    new = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    transformed = new.clone()
    transformed[2] = 5.05
    ctx = BackfillContext(transformed, new, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert misplaced(ctx, chunk=4).tolist() == [False, False, True, False, False, False]
    # its own new embedding is not its neighbour: alone with it, item 0 would be nearest to itself
    assert misplaced(BackfillContext(new, new, torch.tensor([0, 1, 0, 1, 0, 1]))).tolist() == [True] * 6
    first = order_diagnostics(ctx, torch.tensor([2, 0, 1, 3, 4, 5]), fraction=1 / 6)
    assert first == pytest.approx({"fraction": 1 / 6, "error_ratio": 6.0, "misplaced": 1.0, "misplaced_all": 1 / 6})
    assert order_diagnostics(ctx, torch.tensor([0, 1, 2, 3, 4, 5]), fraction=0.5)["misplaced"] == pytest.approx(1 / 3)


def test_curves_say_what_each_policy_backfills_first(synthetic: BackfillContext) -> None:
    out = backfill_curves(synthetic, ("random", "uncertainty", "distance"), seeds=(0, 1), points=3)
    wrong = misplaced(synthetic)
    assert all(out[p]["first"]["misplaced_all"] == pytest.approx(float(wrong.float().mean())) for p in out)
    # the synthetic uncertainty is the noise scale: the most uncertain items are those h maps worst
    assert out["uncertainty"]["first"]["error_ratio"] > 2 * out["random"]["first"]["error_ratio"]
    assert out["distance"]["first"]["error_ratio"] >= out["uncertainty"]["first"]["error_ratio"]
    want = np.mean([order_diagnostics(synthetic, get_policy("random").order(synthetic, s))["misplaced"]
                    for s in (0, 1)])
    assert out["random"]["first"]["misplaced"] == pytest.approx(want)


def test_fixed_orders_are_evaluated_beside_the_policies(synthetic: BackfillContext) -> None:
    """An order handed in is evaluated like a deterministic policy: the uncertainty order handed in gives that
    policy's curves, with the oracle flag the caller gives; a name that is also a policy's is refused."""
    own = get_policy("uncertainty").order(synthetic, 0)
    out = backfill_curves(synthetic, ["uncertainty"], points=5,
                          orders={"handed": (own, False), "reversed": (own.flip(0), True)})
    assert out["handed"]["curves"] == out["uncertainty"]["curves"]
    assert out["handed"]["seeds"] == 1 and out["handed"]["oracle"] is False and out["reversed"]["oracle"] is True
    assert out["reversed"]["auc_mean"]["top1"] < out["handed"]["auc_mean"]["top1"]
    with pytest.raises(ValueError, match="names of policies"):
        backfill_curves(synthetic, ["uncertainty"], points=5, orders={"uncertainty": (own, False)})
    with pytest.raises(ValueError, match="handed"):
        backfill_curves(synthetic, ["random"], points=5, orders={"handed": (own[:-1], False)})
