"""λ-orthogonality adapters: the penalty against its definition, B driven to an orthogonal map by λ, and the
orthogonal variants through fct-fit (from images and from stores), load_h, fct-transform (F), fct-eval, fct-report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from fct_lightning.models.adapters import Adapters, adapter_loss, backward, orthogonality_penalty
from fct_lightning.stages import load_h, load_stage
from fct_lightning.stages.checkpoints import read_checkpoint
from tests.commands import eval_main, report_main, transform_main
from tests.stages.test_chain import SMALL_H, SMALL_NET
from tests.stages.test_chain import run as chain_run


# ----------------------------------------------------------------------------------------------- the penalty
def _naive_penalty(w: np.ndarray) -> float:
    """sum_ij (G_ij - [i == j])^2, G the Gram matrix of W's columns (tall W) or rows (wide W), by loops."""
    vecs = w.T if w.shape[0] >= w.shape[1] else w  # the vectors that can be orthonormal
    total = 0.0
    for i in range(len(vecs)):
        for j in range(len(vecs)):
            total += (float(vecs[i] @ vecs[j]) - (1.0 if i == j else 0.0)) ** 2
    return total


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8)])
def test_penalty_equals_the_definition_and_vanishes_for_orthogonal_maps(shape):
    w = np.random.default_rng(0).normal(size=shape)
    assert float(orthogonality_penalty(torch.as_tensor(w))) == pytest.approx(_naive_penalty(w), rel=1e-10)
    q = scipy.linalg.qr(np.random.default_rng(1).normal(size=(max(shape), max(shape))))[0][: shape[0], : shape[1]]
    assert float(orthogonality_penalty(torch.as_tensor(q))) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="matrix"):
        orthogonality_penalty(torch.ones(3))


def _fit(old: torch.Tensor, new: torch.Tensor, orth_weight: float, steps: int = 1500) -> Adapters:
    """Full-batch Adam on the adapter loss, F and B linear."""
    torch.manual_seed(0)
    h = Adapters(old.shape[1], new.shape[1], forward_kind="linear")
    opt = torch.optim.Adam(h.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = adapter_loss(h(old), new, h.to_old(new), old, h.backward_adapter.weight, orth_weight)
        loss.backward()
        opt.step()
    return h.eval()


def test_adapters_recover_an_orthogonal_map_and_lambda_drives_b_to_orthogonality():
    gen = torch.Generator().manual_seed(0)
    d = 8
    rot = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]  # new = R old (column vectors)
    old = torch.randn(512, d, generator=gen)
    h = _fit(old, old @ rot.T, orth_weight=1.0)
    torch.testing.assert_close(h.forward_adapter.linear.weight.detach(), rot, atol=2e-3, rtol=0)  # F ~ R
    torch.testing.assert_close(h.backward_adapter.weight.detach(), rot.T, atol=2e-3, rtol=0)  # B ~ R^T
    assert float(h.orthogonality().detach()) < 1e-4
    # new = 2 R diag(s) old: the regression alone gives B = diag(1/s) R^T / 2, far from orthogonal; λ pulls it back
    scale = torch.linspace(0.5, 3.0, d)
    new = 2 * (old * scale) @ rot.T
    free, tied = _fit(old, new, orth_weight=0.0), _fit(old, new, orth_weight=10.0)
    want_free = torch.diag(1 / scale) @ rot.T / 2
    torch.testing.assert_close(free.backward_adapter.weight.detach(), want_free, atol=5e-3, rtol=0)
    assert float(free.orthogonality().detach()) > 5.0
    assert float(tied.orthogonality().detach()) < 0.2 * float(free.orthogonality().detach())
    # the penalty costs B's regression: with λ it fits old worse
    assert float(((tied.to_old(new) - old) ** 2).mean()) > float(((free.to_old(new) - old) ** 2).mean()) + 1e-3
    # F (old -> new) is unaffected by λ: the terms are separate
    torch.testing.assert_close(tied(old), free(old), atol=0.05, rtol=0.01)


def test_adapters_rebuild_from_their_config_and_check_inputs():
    h = Adapters(6, 4, side_dim=3, mixer_width=16, mixer_depth=1).eval()
    again = Adapters(**{k: v for k, v in h.config.items() if k != "kind"}).eval()
    again.load_state_dict(h.state_dict())
    old, side, new = torch.randn(5, 6), torch.randn(5, 3), torch.randn(5, 4)
    torch.testing.assert_close(again(old, side), h(old, side))
    torch.testing.assert_close(backward(again, new, batch_size=2), h.to_old(new))
    pred, unc = h.transform_stored(old, side, batch_size=2)
    assert unc is None and torch.allclose(pred, h(old, side), atol=1e-6)
    with pytest.raises(ValueError, match="new_dim=4"):
        h.to_old(torch.randn(5, 6))
    with pytest.raises(ValueError, match="forward_kind"):
        Adapters(6, 4, forward_kind="conv")
    with pytest.raises(ValueError, match="backward adapter"):
        backward(torch.nn.Linear(4, 6), new)
    with pytest.raises(ValueError, match="orth_weight"):
        adapter_loss(new, new, old, old, h.backward_adapter.weight, orth_weight=-1.0)


# ----------------------------------------------------------------------------------------------- through the chain
# every run of this module validates on fct-eval's split (not a held-out part of the training images), so the two
# can be compared number for number below
ON_THE_TEST_SPLIT = ("--data.val_fraction", "0")


def run(stage: str, artifacts, *extra: str):
    return chain_run(stage, artifacts, *extra, *ON_THE_TEST_SPLIT)


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    art = tmp_path_factory.mktemp("orthogonal")
    for stage in ("old", "side_info", "new"):
        run(stage, art, *SMALL_NET)
    return art


@pytest.mark.parametrize(("variant", "space", "backward_cases"),
                         [("orthogonal", "F", ("B/old",)), ("orthogonal_side", "F+side", ())])
def test_orthogonal_fits_evaluates_and_reports(chain_dir, variant, space, backward_cases):
    cli = run(variant, chain_dir, *SMALL_H, "--trainer.max_epochs", "2")
    assert cli.out_dir == chain_dir / "digits" / variant
    metrics = cli.trainer.callback_metrics
    assert {f"val/new/{space}/top1", "val/B/old/top1", "val/old/old/top1", "train/orth_epoch"} <= set(metrics)
    path = cli.out_dir / "best.ckpt"
    assert path.is_file() and (cli.out_dir / "done.json").is_file()
    state = read_checkpoint(path, "orthogonal")["state_dict"]
    assert state and all(k.startswith("h.") for k in state)  # F and B, not the frozen models
    # the adapters a serving machine reads are the ones validated: F on the gallery, B on the queries
    h, meta = load_h(path)
    assert isinstance(h, Adapters) and meta["stage"] == "orthogonal" and h.has_side_info == (space == "F+side")
    assert meta["orthogonality"] == pytest.approx(float(h.orthogonality().detach()), rel=1e-5)
    module, _ = load_stage(path, variant, ("orthogonal",), "digits")
    dm = cli.datamodule
    images = next(iter(dm.eval_dataloader(dm.eval_split)))[0][:16]
    with torch.no_grad():
        f = module.frozen_embeddings(images)
        torch.testing.assert_close(module.gallery_embed(images), h(f["old"], f.get("side")))
        torch.testing.assert_close(module.query_embed(images), backward(h, f["new"]))
        torch.testing.assert_close(module.eval_embeddings(images)["B"], backward(h, f["new"]))
    out = chain_dir / "digits" / "results" / f"{variant}.json"
    cases = ("old/old", "new/new", f"new/{space}", *backward_cases)
    eval_main(["--artifacts", str(chain_dir), "--no_wandb", "--cases", ",".join(cases), "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results["cases"]) == set(cases)
    # fct-eval's new/F and B/old (B on the new model's queries, the old gallery untouched) are the validation
    # callback's (same split, same models)
    for case in cases:
        for metric in ("top1", "map"):
            assert results["cases"][case][metric] == pytest.approx(float(metrics[f"val/{case}/{metric}"]), abs=1e-6)
    report_main([str(out), "--out_dir", str(chain_dir / f"report-{variant}"), "--no_wandb"])
    table = (chain_dir / f"report-{variant}" / "report.md").read_text()
    assert all(f"| {case} |" in table for case in (f"new/{space}", *backward_cases))


def test_orthogonality_weight_reaches_b_on_digits(chain_dir):
    """λ = 0 against a large λ on the digits cache: the penalty of the trained B differs as it should."""
    args = (*SMALL_H, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1.0", "--model.lr", "0.01",
            "--model.warmup_epochs", "0", "--model.forward_kind", "linear", "--model.backward_init", "random",
            "--overwrite")
    free = load_h(run("orthogonal", chain_dir, *args, "--model.orth_weight", "0").out_dir / "best.ckpt")[0]
    tied = load_h(run("orthogonal", chain_dir, *args, "--model.orth_weight", "100").out_dir / "best.ckpt")[0]
    assert float(tied.orthogonality().detach()) < 0.5 * float(free.orthogonality().detach())


def test_b_starts_from_the_procrustes_map_of_the_cache(chain_dir):
    """A fresh run's B is the orthogonal Procrustes map new -> old of the feature cache (scipy's, on the centred
    pairs), so training starts aligned; a random start (the bug behind B/old below chance on digits) is far worse."""
    args = (*SMALL_H, "--trainer.max_epochs", "1", "--model.lr", "1e-7", "--model.warmup_epochs", "0", "--overwrite")
    cli = run("orthogonal", chain_dir, *args)
    caches = [torch.load(f, weights_only=True) for f in (chain_dir / "digits" / "cache").rglob("features.pt")]
    feats = next(c for c in caches if "side" not in c and c["old"].shape[0] == 2)  # orthogonal's: 2 views, no side
    new, old = (feats[k].double().flatten(0, 1).numpy() for k in ("new", "old"))
    rotation, _ = scipy.linalg.orthogonal_procrustes(new - new.mean(0), old - old.mean(0))  # (new - mean) R ~ old
    layer = cli.model.h.backward_adapter
    np.testing.assert_allclose(layer.weight.detach().double().T.numpy(), rotation, atol=1e-4)
    np.testing.assert_allclose(layer.bias.detach().double().numpy(), old.mean(0) - new.mean(0) @ rotation, atol=1e-4)
    aligned = float(cli.trainer.callback_metrics["val/B/old/top1"])
    assert read_checkpoint(cli.out_dir / "best.ckpt", "orthogonal")["fct"]["backward_init"] == "procrustes"
    random = run("orthogonal", chain_dir, *args, "--model.backward_init", "random")
    assert aligned > float(random.trainer.callback_metrics["val/B/old/top1"]) + 0.05  # 0.198 vs 0.100 here


def test_procrustes_backward_is_semi_orthogonal_for_unequal_dimensions():
    from fct_lightning.models.adapters import procrustes_backward

    gen = torch.Generator().manual_seed(0)
    for new_dim, old_dim in ((8, 5), (5, 8)):
        new, old = torch.randn(200, new_dim, generator=gen), torch.randn(200, old_dim, generator=gen)
        w, b = procrustes_backward([(new[:120], old[:120]), (new[120:], old[120:])])  # blocks = one pass
        assert w.shape == (old_dim, new_dim) and float(orthogonality_penalty(w)) < 1e-20
        w1, b1 = procrustes_backward([(new, old)])
        torch.testing.assert_close(w, w1)
        torch.testing.assert_close(b, b1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        procrustes_backward([(new[:1], old[:1])])


def test_options_are_checked(chain_dir):
    with pytest.raises(ValueError, match="forward_kind"):
        run("orthogonal", chain_dir, "--model.forward_kind", "conv", "--overwrite")
    with pytest.raises(ValueError, match="orth_weight"):
        run("orthogonal", chain_dir, "--model.orth_weight", "-1", "--overwrite")
    with pytest.raises(ValueError, match="backward_init"):
        run("orthogonal", chain_dir, "--model.backward_init", "eye", "--overwrite")
    with pytest.raises(ValueError, match="temperature"):
        run("orthogonal", chain_dir, "--model.temperature", "0", "--overwrite")


def test_the_supervised_contrastive_term_trains_and_is_logged(chain_dir):
    cli = run("orthogonal", chain_dir, *SMALL_H, "--model.contrastive_weight", "0.5", "--overwrite")
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/contrastive_epoch"]) > 0 and "val/B/old/top1" in metrics
    assert read_checkpoint(cli.out_dir / "best.ckpt", "orthogonal")["fct"]["contrastive_weight"] == 0.5


def test_fct_transform_applies_f(chain_dir, tmp_path, capsys):
    from fct_lightning.gallery.embed import embed
    from fct_lightning.gallery.files import sidecar

    digits = chain_dir / "digits"
    ckpt = digits / "orthogonal" / "best.ckpt"
    if not ckpt.is_file():
        run("orthogonal", chain_dir, *SMALL_H)
    old = embed(digits / "old" / "best.ckpt", tmp_path / "old.npy", split="test", device="cpu")
    out = transform_main(["--checkpoint", str(ckpt), "--old", str(old), "--out", str(tmp_path / "f.npy"),
                          "--device", "cpu"])
    assert ", F)" in capsys.readouterr().out
    h, h_meta = load_h(ckpt)
    with torch.no_grad():
        want = h(torch.from_numpy(np.load(old).astype(np.float32))).numpy()
    np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-4)
    meta = json.loads(sidecar(out, "meta").read_text())
    assert (meta["stage"], meta["space"], meta["digest"]) == ("orthogonal", "F", h_meta["digest"])


# ----------------------------------------------------------------------------------------------- from stores
def test_orthogonal_from_stores(tmp_path):
    from tests.commands import fit_main
    from tests.test_embeddings_data import make_store

    dims = {"old": 16, "side_info": 8, "new": 12}
    train, val = make_store(tmp_path / "train", 300, dims), make_store(tmp_path / "val", 120, dims, seed=1)
    cli = fit_main(["--stage", "orthogonal", "--data", "embeddings", "--data.train", str(train), "--data.val", str(val),
                    "--artifacts", str(tmp_path / "art"), "--trainer.max_epochs", "2", "--model.mixer_width", "32",
                    "--data.batch_size", "64", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false"])
    assert {"val/new/F/top1", "val/B/old/top1"} <= set(cli.trainer.callback_metrics)
    h, meta = load_h(tmp_path / "art" / "synthetic" / "orthogonal" / "best.ckpt")
    assert (h.old_dim, h.new_dim, h.side_dim) == (16, 12, None)  # B: 12 -> 16, a tall (isometric) map
    assert tuple(h.backward_adapter.weight.shape) == (16, 12)
    assert (meta["old_digest"], meta["new_digest"]) == ("ckpt-old", "ckpt-new")
