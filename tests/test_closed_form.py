"""Closed-form transformations: the fits against scipy.linalg / scikit-learn, Procrustes recovering an orthogonal map,
fits from a store shard by shard, checkpoints through load_h, and every family through fct-fit, fct-eval, fct-report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.linear_model import Ridge

from fct_lightning import fit_linear, fit_procrustes
from fct_lightning.models.closed_form import LinearMap, OrthogonalMap
from fct_lightning.stages import load_h, load_stage
from fct_lightning.store import import_arrays, open_store
from tests.commands import eval_main, report_main
from tests.stages.test_chain import SMALL_NET, run


def _data(n=300, p=12, q=7, side=5, seed=0):
    rng = np.random.default_rng(seed)
    old, s = rng.normal(size=(n, p)) + 2.0, rng.normal(size=(n, side))
    new = np.concatenate([old, s], 1) @ rng.normal(size=(p + side, q)) + rng.normal(size=q)
    new += 0.3 * rng.normal(size=(n, q))
    return old, s, new


def test_linear_equals_scipy_lstsq():
    old, side, new = _data()
    h = fit_linear(old, new, side)
    x = np.concatenate([old, side, np.ones((len(old), 1))], 1)
    want = scipy.linalg.lstsq(x, new)[0]
    np.testing.assert_allclose(h.weight.detach().double().numpy(), want[:-1], atol=1e-5)
    np.testing.assert_allclose(h.bias.detach().double().numpy(), want[-1], atol=1e-5)
    got = h(torch.as_tensor(old, dtype=torch.float32), torch.as_tensor(side, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), x @ want, atol=1e-4)
    # without side-info, from torch tensors
    h0 = fit_linear(torch.as_tensor(old), torch.as_tensor(new))
    want0 = scipy.linalg.lstsq(np.c_[old, np.ones(len(old))], new)[0]
    np.testing.assert_allclose(h0.weight.detach().double().numpy(), want0[:-1], atol=1e-5)
    assert h0.side_dim is None and h.side_dim == side.shape[1]


def test_linear_rank_deficient_is_the_minimum_norm_solution():
    """A constant (dead ReLU) and a duplicated dimension: scipy's minimum-norm least squares, not an error."""
    old, _, new = _data(p=6, side=1)
    old[:, 2] = 0.0
    old[:, 4] = old[:, 3]
    h = fit_linear(old, new)
    want = scipy.linalg.lstsq(np.c_[old, np.ones(len(old))], new)[0]
    np.testing.assert_allclose(h.weight.detach().double().numpy(), want[:-1], atol=1e-5)
    np.testing.assert_allclose(h.bias.detach().double().numpy(), want[-1], atol=1e-5)


def test_ridge_equals_the_closed_form_and_sklearn():
    old, side, new = _data()
    lam = 7.5
    h = fit_linear(old, new, side, ridge=lam)
    x = np.concatenate([old, side], 1)
    xc, yc = x - x.mean(0), new - new.mean(0)
    w = scipy.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    np.testing.assert_allclose(h.weight.detach().double().numpy(), w, atol=1e-5)
    np.testing.assert_allclose(h.bias.detach().double().numpy(), new.mean(0) - x.mean(0) @ w, atol=1e-5)
    sk = Ridge(alpha=lam).fit(x, new)
    np.testing.assert_allclose(h.weight.detach().double().numpy(), sk.coef_.T, atol=1e-5)
    assert not np.allclose(w, scipy.linalg.lstsq(np.c_[x, np.ones(len(x))], new)[0][:-1], atol=1e-3)  # ridge acts
    with pytest.raises(ValueError, match="ridge"):
        fit_linear(old, new, ridge=-1.0)


def test_procrustes_equals_scipy_and_recovers_an_orthogonal_map():
    rng = np.random.default_rng(1)
    old = rng.normal(size=(200, 8))
    new = old @ rng.normal(size=(8, 8)) + 0.1 * rng.normal(size=(200, 8))
    h = fit_procrustes(old, new, center=False)
    want, _ = scipy.linalg.orthogonal_procrustes(old, new)
    np.testing.assert_allclose(h.rotation.detach().double().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(h.bias.detach().numpy(), 0.0, atol=1e-6)
    centred = fit_procrustes(old, new)
    want_c, _ = scipy.linalg.orthogonal_procrustes(old - old.mean(0), new - new.mean(0))
    np.testing.assert_allclose(centred.rotation.detach().double().numpy(), want_c, atol=1e-5)
    # exactly related: y = 3 (x R) + t is recovered, the scale only with scale=True
    rot = scipy.linalg.qr(rng.normal(size=(8, 8)))[0]
    shift = rng.normal(size=8)
    y = 3.0 * old @ rot + shift
    exact = fit_procrustes(old, y, scale=True)
    np.testing.assert_allclose(exact.rotation.detach().double().numpy(), rot, atol=1e-5)
    assert float(exact.scale) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(exact(torch.as_tensor(old, dtype=torch.float32)).numpy(), y, atol=1e-4)
    r = exact.rotation.detach().double()
    torch.testing.assert_close(r.T @ r, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    # unequal dimensions: R = U V^T of the thin SVD, semi-orthogonal, and the best such map (an isometry 8 -> 11
    # recovered exactly; 8 -> 5 the least-squares orthogonal projection, at least as good as any other one)
    wide = scipy.linalg.qr(rng.normal(size=(11, 11)))[0][:8]  # [8, 11], orthonormal rows
    up = fit_procrustes(old, old @ wide + shift[0])
    np.testing.assert_allclose(up.rotation.detach().double().numpy(), wide, atol=1e-5)
    down = fit_procrustes(old, new[:, :5])
    r = down.rotation.detach().double()
    torch.testing.assert_close(r.T @ r, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    xc, yc = old - old.mean(0), new[:, :5] - new[:, :5].mean(0)
    best = np.linalg.norm(xc @ r.numpy() - yc)
    for seed in range(5):
        other = scipy.linalg.qr(np.random.default_rng(seed).normal(size=(8, 8)))[0][:, :5]
        assert best <= np.linalg.norm(xc @ other - yc) + 1e-9


def test_fits_from_a_store_shard_by_shard_equal_the_fits_from_arrays(tmp_path):
    old, side, new = _data(n=250, p=6, q=6, side=3)
    files = {}
    for name, arr in (("old", old), ("side_info", side), ("new", new)):
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], arr.astype(np.float32))
    store = open_store(import_arrays(tmp_path / "store", files, shard_rows=64).path)
    assert len(store.shards) == 4
    from_store = fit_linear("old", "new", "side_info", store=store, batch_rows=30)
    f32 = [a.astype(np.float32) for a in (old, new, side)]
    from_arrays = fit_linear(f32[0], f32[1], f32[2])
    torch.testing.assert_close(from_store.weight, from_arrays.weight, atol=1e-5, rtol=0)
    proc_store = fit_procrustes("old", "new", store=store, batch_rows=50)
    torch.testing.assert_close(proc_store.weight, fit_procrustes(f32[0], f32[1]).weight, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="space names"):
        fit_linear(old, new, store=store)


def test_maps_rebuild_from_their_config_and_check_inputs():
    h = fit_linear(*_data()[::2])
    again = LinearMap(**{k: v for k, v in h.config.items() if k != "kind"})
    again.load_state_dict(h.state_dict())
    x = torch.randn(4, 12)
    torch.testing.assert_close(again(x), h(x))
    pred, unc = h.transform_stored(x, batch_size=3)
    assert unc is None and torch.allclose(pred, h(x))
    with pytest.raises(ValueError, match="old_dim=12"):
        h(torch.randn(4, 11))
    with pytest.raises(ValueError, match="without side-info"):
        h(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="side-info"):
        OrthogonalMap(4, 4, side_dim=2)


# ----------------------------------------------------------------------------------------------- through the chain
@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    art = tmp_path_factory.mktemp("closed")
    for stage in ("old", "side_info", "new"):
        run(stage, art, *SMALL_NET)
    return art


@pytest.mark.parametrize(("variant", "space"), [("linear", "linear+side"), ("linear_noside", "linear"),
                                                ("procrustes", "procrustes")])
def test_every_family_fits_evaluates_and_reports(chain_dir, variant, space, capsys):
    cli = run(variant, chain_dir, "--model.cache_views", "2")
    assert cli.out_dir == chain_dir / "digits" / variant
    assert f"val/{space}/old/top1" in cli.trainer.callback_metrics
    path = cli.out_dir / "best.ckpt"
    assert path.is_file() and (cli.out_dir / "done.json").is_file()
    # the h a serving machine reads equals the one validated, and is the least-squares / Procrustes fit of the cache
    h, meta = load_h(path)
    assert meta["stage"] == "closed_form" and h.config["kind"] == cli.model.family
    torch.testing.assert_close(h.weight, cli.model.h.weight.cpu())
    cache = next((chain_dir / "digits" / "cache").rglob("features.pt"))
    feats = torch.load(cache, weights_only=True)
    x = feats["old"].double().flatten(0, 1).numpy()
    if space == "linear+side":
        x = np.concatenate([x, feats["side"].double().flatten(0, 1).numpy()], 1)
    y = feats["new"].double().flatten(0, 1).numpy()
    if variant == "procrustes":
        want, _ = scipy.linalg.orthogonal_procrustes(x - x.mean(0), y - y.mean(0))
        np.testing.assert_allclose(h.rotation.double().numpy(), want, atol=1e-4)
    else:
        want = scipy.linalg.lstsq(np.c_[x, np.ones(len(x))], y)[0][:-1]
        np.testing.assert_allclose(h.weight.double().numpy(), want, atol=1e-3 * np.abs(want).max())
    module, _ = load_stage(path, variant, ("closed_form",), "digits")
    assert module.family == cli.model.family
    out = chain_dir / "digits" / "results" / f"{variant}.json"
    eval_main(["--artifacts", str(chain_dir), "--no_wandb", "--cases", f"old/old,new/new,{space}/old",
               "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results["cases"]) == {"old/old", "new/new", f"{space}/old"}
    assert set(results["flips"]) == {"new/new", f"{space}/old"}
    assert all(0 <= v <= 1 for f in results["flips"].values() for v in f.values())
    report_main([str(out), "--out_dir", str(chain_dir / f"report-{variant}"), "--no_wandb"])
    table = (chain_dir / f"report-{variant}" / "report.md").read_text()
    assert f"| {space}/old |" in table and "## Flips against old/old" in table and "## Compatibility matrices" in table
    assert (chain_dir / f"report-{variant}" / "compat.png").is_file()


def test_closed_form_options_are_checked(chain_dir):
    with pytest.raises(ValueError, match="procrustes"):
        run("procrustes", chain_dir, "--model.use_side_info", "true")


# ----------------------------------------------------------------------------------------------- fct-transform
def test_fct_transform_writes_the_variants_space_with_the_map_applied(chain_dir, tmp_path, capsys):
    """fct-transform on a closed-form h (one .npy file, and a store): the default space is the variant's (the
    registry's), the description names the closed_form stage, and the rows are the map applied to the old (and
    side-info) rows; a transformed file imported into a store keeps h's store role."""
    from fct_lightning.gallery.embed import embed
    from fct_lightning.gallery.files import read_meta, sidecar
    from tests.commands import transform_main

    digits = chain_dir / "digits"
    old = embed(digits / "old" / "best.ckpt", tmp_path / "old.npy", split="test", device="cpu")
    side = embed(digits / "side_info" / "best.ckpt", tmp_path / "side.npy", split="test", device="cpu")
    store = import_arrays(tmp_path / "store", {"old": old, "side_info": side}, shard_rows=128,
                          describe=read_meta).path
    x_old, x_side = (np.load(p).astype(np.float64) for p in (old, side))
    for variant, space in (("linear", "linear+side"), ("linear_noside", "linear"), ("procrustes", "procrustes")):
        ckpt = digits / variant / "best.ckpt"
        if not ckpt.is_file():  # test_every_family_fits_evaluates_and_reports trains it when it runs first
            run(variant, chain_dir, "--model.cache_views", "2")
        h, h_meta = load_h(ckpt)
        with_side = space == "linear+side"
        x = np.concatenate([x_old, x_side], 1) if with_side else x_old
        want = x @ h.weight.double().numpy() + h.bias.double().numpy()
        # one file
        side_args = ["--side", str(side)] if with_side else []
        out = transform_main(["--checkpoint", str(ckpt), "--old", str(old), *side_args,
                              "--out", str(tmp_path / f"{variant}.npy"), "--device", "cpu"])
        assert f", {space})" in capsys.readouterr().out
        meta = json.loads(sidecar(out, "meta").read_text())
        assert (meta["stage"], meta["space"], meta["digest"]) == ("closed_form", space, h_meta["digest"])
        np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-4)
        imported = import_arrays(tmp_path / f"imported-{variant}", {space: out}, describe=read_meta)
        assert imported.space(space).role == "transformation"
        # a store
        assert transform_main(["--checkpoint", str(ckpt), "--store", str(store), "--device", "cpu"]) == store
        assert f"space {space} of {store}" in capsys.readouterr().out
        st = open_store(store)
        info = st.space(space)
        assert (info.role, info.dim, info.checkpoint_digest) == ("transformation", h.new_dim, h_meta["digest"])
        rows = np.concatenate([st.array(space, i) for i in range(len(st.shards))])
        np.testing.assert_allclose(rows, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(rows, np.load(out))
    assert {"fct", "fct+side"}.isdisjoint(open_store(store).spaces)
