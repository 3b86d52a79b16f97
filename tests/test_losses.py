"""Losses against naive loops written from the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fct_lightning.losses import (
    bct_influence_loss,
    check_finite,
    fastfill_loss,
    label_smoothed_cross_entropy,
    nt_xent,
    synthesize_classifier_rows,
    transformation_loss,
)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. (1), one anchor at a time, averaged over all 2B anchors."""
    z = [v.double() for v in torch.cat([z1, z2])]
    n, b = len(z), len(z1)

    def sim(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    total = 0.0
    for i in range(n):
        j = (i + b) % n
        den = sum(math.exp(sim(z[i], z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / t) / den)
    return total / n


def naive_ce(logits: torch.Tensor, target: torch.Tensor, eps: float) -> list[float]:
    out = []
    for row, y in zip(logits.double(), target.tolist(), strict=True):
        log_z = math.log(sum(math.exp(float(v)) for v in row))
        log_p = [float(v) - log_z for v in row]
        out.append(-(1 - eps) * log_p[y] - eps * sum(log_p) / len(log_p))
    return out


# --- NT-Xent ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d,t", [(1, 3, 0.5), (4, 8, 0.1), (7, 5, 1.0)])
def test_nt_xent_matches_naive_loop(gen, b, d, t):
    z1, z2 = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5, abs=1e-6)


def test_nt_xent_is_scale_invariant_and_symmetric(gen):
    z1, z2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    ref = nt_xent(z1, z2)
    torch.testing.assert_close(nt_xent(3 * z1, 0.5 * z2), ref)
    torch.testing.assert_close(nt_xent(z2, z1), ref)


def test_nt_xent_decreases_when_training_linear_encoder(gen):
    items = torch.randn(32, 10, generator=gen)
    view1 = items + 0.3 * torch.randn(32, 10, generator=gen)
    view2 = items + 0.3 * torch.randn(32, 10, generator=gen)
    torch.manual_seed(0)
    enc = torch.nn.Linear(10, 6)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = nt_xent(enc(view1), enc(view2), temperature=0.2)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_nt_xent_errors():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        nt_xent(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


# --- label-smoothed CE -----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothed_ce_matches_torch_and_naive(gen, eps):
    logits, target = torch.randn(5, 7, generator=gen), torch.randint(0, 7, (5,), generator=gen)
    ours = label_smoothed_cross_entropy(logits, target, smoothing=eps)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=eps))
    per_item = label_smoothed_cross_entropy(logits, target, smoothing=eps, reduction="none")
    # an fp32 computation against the float64 reference: fp32 tolerances
    torch.testing.assert_close(per_item, torch.tensor(naive_ce(logits, target, eps), dtype=torch.float32))


def test_label_smoothed_ce_errors():
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\), got 1.0"):
        label_smoothed_cross_entropy(logits, target, smoothing=1.0)
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_cross_entropy(logits, target, smoothing=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        label_smoothed_cross_entropy(logits, target, reduction="sum")
    with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[3\]"):
        label_smoothed_cross_entropy(logits, target[:2])
    with pytest.raises(ValueError, match="integer"):
        label_smoothed_cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        label_smoothed_cross_entropy(logits[0], target)


# --- BCT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bct_influence_matches_naive(gen, eps):
    emb, w = torch.randn(6, 5, generator=gen, requires_grad=True), torch.randn(4, 5, generator=gen)
    target = torch.randint(0, 4, (6,), generator=gen)
    logits = [[float(e @ row) for row in w] for e in emb.detach()]
    expected = sum(naive_ce(torch.tensor(logits), target, eps)) / 6
    loss = bct_influence_loss(emb, w, target, smoothing=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_bct_influence_does_not_train_old_classifier(gen):
    w = torch.randn(4, 5, generator=gen, requires_grad=True)
    bct_influence_loss(torch.randn(3, 5, requires_grad=True), w, torch.tensor([0, 1, 2])).backward()
    assert w.grad is None


def test_bct_dimension_mismatch_message():
    with pytest.raises(
        ValueError, match=r"new embedding dimension 8 != old classifier dimension 5.*must match"
    ):
        bct_influence_loss(torch.randn(3, 8), torch.randn(4, 5), torch.tensor([0, 1, 2]))


# --- synthesized classifier rows -------------------------------------------------------------------


def test_synthesize_copies_seen_rows_and_means_unseen(gen):
    old_w = torch.randn(2, 3, generator=gen)
    emb = torch.randn(9, 3, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 2, 3, 3, 0, 1])
    w = synthesize_classifier_rows(old_w, [3, 1], emb, labels, num_classes=4)
    assert w.shape == (4, 3)
    torch.testing.assert_close(w[3], old_w[0])
    torch.testing.assert_close(w[1], old_w[1])
    for c in (0, 2):
        torch.testing.assert_close(w[c], emb[labels == c].mean(0))
    assert not w.requires_grad


def test_synthesize_errors():
    old_w, emb = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"classes \[3\] have no row"):
        synthesize_classifier_rows(old_w, [0, 1], emb, torch.tensor([0, 1, 2, 2]), num_classes=4)
    with pytest.raises(ValueError, match="3 entries"):
        synthesize_classifier_rows(old_w, [0, 1, 2], emb, torch.tensor([0, 1, 2, 2]), num_classes=3)
    with pytest.raises(ValueError, match="unique"):
        synthesize_classifier_rows(old_w, [1, 1], emb, torch.tensor([0, 1, 2, 2]), num_classes=3)
    with pytest.raises(ValueError, match="outside"):
        synthesize_classifier_rows(old_w, [0, 5], emb, torch.tensor([0, 1, 2, 2]), num_classes=3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        synthesize_classifier_rows(
            old_w, [0, 1], torch.randn(4, 2), torch.tensor([0, 1, 2, 2]), num_classes=3
        )
    with pytest.raises(ValueError, match="labels must be in"):
        synthesize_classifier_rows(old_w, [0, 1], emb, torch.tensor([0, 1, 2, 7]), num_classes=3)


# --- transformation / FastFill ---------------------------------------------------------------------


def test_transformation_loss(gen):
    pred, target = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    torch.testing.assert_close(transformation_loss(pred, target), F.mse_loss(pred, target))
    cos = transformation_loss(pred, target, "cosine", reduction="none")
    naive = [1 - float(p @ t / (p.norm() * t.norm())) for p, t in zip(pred, target, strict=True)]
    torch.testing.assert_close(cos, torch.tensor(naive))
    assert transformation_loss(pred, 2 * pred, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="kind"):
        transformation_loss(pred, target, "l1")
    with pytest.raises(ValueError, match="same shape"):
        transformation_loss(pred, target[:, :3])


def naive_fastfill(pred, target, s, logits, labels, eps, sim=True, disc=True) -> float:
    ce = naive_ce(logits, labels, eps)
    total = 0.0
    for i in range(len(pred)):
        err = float(((pred[i] - target[i]) ** 2).mean()) if sim else 0.0
        err += ce[i] if disc else 0.0
        total += 0.5 * math.exp(-float(s[i])) * err + 0.5 * float(s[i])
    return total / len(pred)


@pytest.mark.parametrize("sim,disc", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", ["flat", "column"])
def test_fastfill_matches_formula(gen, sim, disc, shape):
    pred, target = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    s, logits = torch.randn(6, generator=gen), torch.randn(6, 5, generator=gen)
    labels = torch.randint(0, 5, (6,), generator=gen)
    log_var = s if shape == "flat" else s[:, None]
    got = fastfill_loss(
        pred,
        target,
        log_var,
        discriminative_logits=logits,
        labels=labels,
        smoothing=0.1,
        use_similarity=sim,
        use_discriminative=disc,
    )
    assert got.item() == pytest.approx(
        naive_fastfill(pred, target, s, logits, labels, 0.1, sim, disc), rel=1e-5
    )


def test_fastfill_zero_log_var_is_half_mse(gen):
    pred, target = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    got = fastfill_loss(pred, target, torch.zeros(6), use_discriminative=False)
    torch.testing.assert_close(got, 0.5 * F.mse_loss(pred, target))


def test_fastfill_summed_similarity_is_the_squared_distance(gen):
    pred, target = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    s = torch.randn(6, generator=gen)
    got = fastfill_loss(pred, target, s, use_discriminative=False, similarity_reduction="sum")
    want = (0.5 * torch.exp(-s) * ((pred - target) ** 2).sum(dim=1) + 0.5 * s).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="similarity_reduction='max' is not known"):
        fastfill_loss(pred, target, s, use_discriminative=False, similarity_reduction="max")


def test_fastfill_errors():
    pred, target = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="use_similarity or use_discriminative"):
        fastfill_loss(pred, target, torch.zeros(3), use_similarity=False, use_discriminative=False)
    with pytest.raises(ValueError, match="discriminative_logits"):
        fastfill_loss(pred, target, torch.zeros(3))
    with pytest.raises(ValueError, match="log_var"):
        fastfill_loss(pred, target, torch.zeros(3, 2), use_discriminative=False)
    with pytest.raises(ValueError, match=r"\[3, C\]"):
        fastfill_loss(
            pred,
            target,
            torch.zeros(3),
            discriminative_logits=torch.randn(2, 5),
            labels=torch.tensor([0, 1, 2]),
        )


# --- check_finite ----------------------------------------------------------------------------------


def test_check_finite():
    check_finite(torch.tensor(1.0), "old")
    with pytest.raises(
        FloatingPointError, match="loss of transformation is NaN at step 7; lower the learning"
    ):
        check_finite(torch.tensor(float("nan")), "transformation", step=7)
    with pytest.raises(FloatingPointError, match=r"loss of bct is inf; .*--trainer.gradient_clip_val 1.0"):
        check_finite(torch.tensor([1.0, float("inf")]), "bct")


def test_supervised_contrastive_equals_the_definition():
    from fct_lightning.losses import supervised_contrastive

    gen = torch.Generator().manual_seed(0)
    a, c = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    an, cn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(c, dim=1)
    want = []
    for i in range(6):
        logits = [float(an[i] @ cn[j]) / 0.2 for j in range(6)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        positives = [j for j in range(6) if labels[j] == labels[i]]
        want.append(-sum(logits[p] - log_z for p in positives) / len(positives))
    assert float(supervised_contrastive(a, c, labels, 0.2)) == pytest.approx(sum(want) / 6, rel=1e-5)
    # aligned, well-separated classes cost less than shuffled ones
    centres = torch.eye(3)[labels] * 5
    shuffled = centres[[1, 0, 3, 2, 5, 4]]
    assert supervised_contrastive(centres, centres, labels) < supervised_contrastive(centres, shuffled, labels)
    with pytest.raises(ValueError, match="label"):
        supervised_contrastive(a, c, torch.tensor([0, 1, -1, 2, 1, 0]))
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive(a, c, labels, 0.0)
