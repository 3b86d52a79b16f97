"""Chains of model versions: the plan's checks, the runs it lays out, the matrices on made-up embeddings, and a tiny
digits chain v1 -> v2 -> v3 trained and evaluated end to end (its entries equal fct-eval's cases on the same models)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fct_lightning.commands import run_command
from fct_lightning.commands.fit import fit
from fct_lightning.commands.versions import fit_in_subprocess, versions_command
from fct_lightning.retrieval.compat import ac, am
from fct_lightning.versions import load_plan, matrices, parse_plan, plan_steps, run_steps, scores
from fct_lightning.versions.matrix import held_galleries
from fct_lightning.versions.plan import pending
from tests.commands import eval_main
from tests.stages.test_chain import TINY

PLAN = {"versions": [{"name": "v1", "variant": "old"}, {"name": "v2", "stage": "new", "classes": 7, "seed": 7},
                     {"name": "v3", "variant": "new"}]}


# ----------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize(("data", "message"), [
    ({"versions": [{"name": "v1", "variant": "old"}]}, "at least two versions"),
    ({"versions": [{"name": "v1", "variant": "old", "stage": "new"}, {"name": "v2", "variant": "new"}]},
     "exactly one of variant"),
    ({"versions": [{"name": "v1", "variant": "bct"}, {"name": "v2", "variant": "new"}]}, "not an image model"),
    ({"versions": [{"name": "v1", "variant": "old"}, {"name": "v1", "variant": "new"}]}, "names must differ"),
    ({"versions": [{"name": "v1", "variant": "old"}, {"name": "v2", "stage": "new", "classes": 0}]}, "classes=0"),
    ({"versions": [{"name": "v1", "variant": "old", "classes": 3}, {"name": "v2", "variant": "new"}]},
     "do not apply"),
    ({**PLAN, "transformation": "bct"}, "does not map an old gallery"),
    ({**PLAN, "transformation": "nope"}, "not a registered variant"),
    ({**PLAN, "typo": 1}, "unknown keys"),
    ({"versions": [{"name": "v1", "variant": "old", "colour": 1}, {"name": "v2", "variant": "new"}]}, "unknown keys"),
])
def test_a_wrong_plan_is_one_clear_error(data, message):
    with pytest.raises(ValueError, match=message):
        parse_plan(data, "test.yaml")


def test_missing_plan_names_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datasets with a packaged plan: \['cifar10', 'digits'\]"):
        load_plan("cifar100")


def test_the_steps_train_what_the_plan_adds_and_reuse_the_chain(tmp_path):
    plan = parse_plan(PLAN)
    steps, versions, hs = plan_steps(plan, "digits", tmp_path, seed=2, common=["--trainer.max_epochs", "1"])
    assert [s.name for s in steps] == ["old", "v2", "new", "side_info", "v1-v2", "v2-v3", "transformation"]
    by = {s.name: s for s in steps}
    v2 = by["v2"].argv
    assert v2[v2.index("--data.train_classes") + 1] == "7" and v2[v2.index("--seed") + 1] == "207"
    assert versions == {"v1": tmp_path / "digits/old/best.ckpt",
                        "v2": tmp_path / "digits/versions/v2/digits/new/best.ckpt",
                        "v3": tmp_path / "digits/new/best.ckpt"}
    h12 = by["v1-v2"].argv
    assert h12[h12.index("--model.old_checkpoint") + 1] == str(versions["v1"])
    assert h12[h12.index("--model.new_checkpoint") + 1] == str(versions["v2"])
    assert h12[h12.index("--model.side_info_checkpoint") + 1] == str(tmp_path / "digits/side_info/best.ckpt")
    assert all(s.argv[-2:] == ("--resume", "auto") and "--trainer.max_epochs" in s.argv for s in steps)
    # the direct update v1 -> v3 is the chain's own transformation: v1 and v3 are the chain's old and new models
    assert hs == {(0, 1): by["v1-v2"].checkpoint, (1, 2): by["v2-v3"].checkpoint,
                  (0, 2): tmp_path / "digits/transformation/best.ckpt"}
    assert plan_steps(parse_plan({**PLAN, "direct": False}), "digits", tmp_path)[2].keys() == {(0, 1), (1, 2)}
    noside = plan_steps(parse_plan({**PLAN, "transformation": "linear_noside"}), "digits", tmp_path)[0]
    assert "side_info" not in [s.name for s in noside] and "linear_noside" in [s.name for s in noside]


# ----------------------------------------------------------------------------------------------- the matrices
class _Map:
    """A linear h: old rows @ weight (side-info ignored)."""

    def __init__(self, weight):
        self.weight = weight

    def transform(self, old, side=None):
        return old @ self.weight


def _rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def test_composed_direct_and_untransformed_galleries():
    feats = [torch.randn(5, 3) for _ in range(3)]
    hs = {(0, 1): _Map(2 * torch.eye(3)), (1, 2): _Map(3 * torch.eye(3)), (0, 2): _Map(-torch.eye(3))}
    fct = held_galleries(feats, None, hs, "fct")
    assert set(fct) == {(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)}
    torch.testing.assert_close(fct[(2, 0)], 6 * feats[0])  # h(v2->v3) o h(v1->v2)
    torch.testing.assert_close(fct[(2, 1)], 3 * feats[1])
    direct = held_galleries(feats, None, hs, "direct")
    torch.testing.assert_close(direct[(2, 0)], -feats[0])
    torch.testing.assert_close(direct[(1, 0)], 2 * feats[0])
    assert held_galleries(feats, None, hs, "none")[(2, 0)] is feats[0]
    other = [feats[0], torch.randn(5, 4), feats[2]]  # v2 of another dimension: no untransformed pair with it
    assert set(held_galleries(other, None, hs, "none")) == {(0, 0), (1, 1), (2, 2), (2, 0)}


def test_exact_inverse_maps_make_every_gallery_compatible():
    """Versions that are rotations of one embedding, updates that undo them: the transformed matrix equals the
    diagonal everywhere (AC 0: never above, AM the mean), while untransformed galleries fall to chance."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(20)
    base = torch.nn.functional.one_hot(labels, 10).float() * 3 + 0.6 * torch.randn(200, 10, generator=gen)
    rot = [_rotation(10, s) for s in (1, 2, 3)]
    feats = [base @ r for r in rot]
    hs = {(0, 1): _Map(rot[0].T @ rot[1]), (1, 2): _Map(rot[1].T @ rot[2]), (0, 2): _Map(rot[0].T @ rot[2])}
    got = matrices(feats, None, labels, hs)
    assert set(got) == {"fct", "direct", "none"}
    fct, none = np.array(got["fct"]["top1"], dtype=float), np.array(got["none"]["top1"], dtype=float)
    assert np.isnan(fct[0, 1]) and np.isnan(fct[0, 2])  # older queries against newer galleries: not evaluated
    np.testing.assert_allclose(fct[np.tril_indices(3)], fct[0, 0], atol=1e-6)
    assert fct[0, 0] > 0.9 and none[2, 0] < 0.5
    assert got["fct"]["neg_flip"][2][0] == pytest.approx(0.0) and got["fct"]["neg_flip"][1][1] == 0.0
    assert got["none"]["neg_flip"][2][0] > 0.4
    s = scores(got["fct"])["top1"]
    assert s["ac"] == ac(fct) == 0.0 and s["am"] == pytest.approx(am(fct))
    assert scores(got["none"])["top1"]["ac"] == 0.0


def test_an_entry_two_kinds_hold_the_same_way_is_evaluated_once(monkeypatch):
    """The diagonal is the same gallery in every kind and ``direct`` differs from ``fct`` only where a direct h
    exists: of 3 + 3 + 3 diagonal-and-sequence entries, 1 direct and 3 untransformed ones, 10 are evaluated
    (was 18), with the same numbers."""
    from fct_lightning.versions import matrix as module

    labels = torch.arange(4).repeat_interleave(5)
    feats = [torch.nn.functional.one_hot(labels, 4).float() + 0.3 * torch.randn(20, 4) for _ in range(3)]
    hs = {(0, 1): _Map(2 * torch.eye(4)), (1, 2): _Map(torch.eye(4)), (0, 2): _Map(-torch.eye(4))}
    calls = []
    real = module.evaluate_queries
    monkeypatch.setattr(module, "evaluate_queries", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = matrices(feats, None, labels, hs)
    assert len(calls) == 10
    for kind in ("fct", "direct"):
        for i, j in ((0, 0), (1, 1), (2, 2), (1, 0), (2, 1)):
            assert got[kind]["map"][i][j] == got["fct"]["map"][i][j]
    alone = {}
    for kind in ("fct", "direct", "none"):  # each kind's entries as computed on their own
        for (i, j), gallery in held_galleries(feats, None, hs, kind).items():
            per = real(feats[i], labels, gallery, labels, exclude_self=True)
            alone[(kind, i, j)] = float(module.summarize(per, (1, 5), map_at_r=True)["map"])
    assert {key: got[key[0]]["map"][key[1]][key[2]] for key in alone} == pytest.approx(alone)


# ----------------------------------------------------------------------------------------------- end to end
def _fit_in_process(argv):
    fit(list(argv))
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    art = tmp_path_factory.mktemp("versions")
    plan = load_plan("digits")
    steps, versions, hs = plan_steps(plan, "digits", art, common=TINY)
    ran = run_steps(steps, runner=_fit_in_process, log=lambda _: None)
    return art, plan, steps, versions, hs, ran


def test_a_plan_trains_once_and_goes_on_where_it_stopped(trained):
    art, plan, steps, _, _, ran = trained
    assert ran == ["old", "v2", "new", "side_info", "v1-v2", "v2-v3", "transformation"]
    assert not any(pending(s) for s in steps) and run_steps(steps, runner=None) == []  # nothing runs again
    # a version re-trained after an update was trained makes that update pending again, and only it
    v2 = next(s for s in steps if s.name == "v2")
    done = v2.out / "done.json"
    later = max(os.stat(s.out / "done.json").st_mtime for s in steps) + 10
    os.utime(done, (later, later))
    assert [s.name for s in steps if pending(s)] == ["v1-v2", "v2-v3"]
    os.utime(done, (later - 20, later - 20))


def test_the_matrix_of_a_trained_chain_agrees_with_fct_eval(trained, capsys):
    art, *_ = trained
    results = run_command("fct-versions", versions_command, ["--artifacts", str(art), "--eval_only", "--no_wandb",
                                                              "--device", "cpu"])
    out = art / "digits" / "versions"
    saved = json.loads((out / "results.json").read_text())
    assert saved["matrices"]["fct"]["top1"][0][1] is None and saved == json.loads(json.dumps(saved))
    assert [v["name"] for v in saved["versions"]] == ["v1", "v2", "v3"]
    assert [v["classes"] for v in saved["versions"]] == [5, 7, 10]
    assert set(saved["updates"]) == {"v1->v2", "v2->v3", "v1->v3"}
    text = (out / "versions.md").read_text()
    assert "Model-update chain: v1 -> v2 -> v3" in text and "| v3/v1, one h v1 -> v3 |" in text
    assert (out / "versions.png").is_file()
    # the chain's own cases on the same split: old/old = M[1][1], new/new = M[3][3], fct+side/old = direct M[3][1]
    ref = art / "eval.json"
    eval_main(["--artifacts", str(art), "--no_wandb", "--device", "cpu", "--cases", "old/old,new/new,fct+side/old",
               "--out", str(ref)])
    cases = json.loads(ref.read_text())["cases"]
    m = results["matrices"]
    for metric in ("top1", "map", "map@r"):
        assert m["fct"][metric][0][0] == pytest.approx(cases["old/old"][metric], abs=1e-6)
        assert m["fct"][metric][2][2] == pytest.approx(cases["new/new"][metric], abs=1e-6)
        assert m["direct"][metric][2][0] == pytest.approx(cases["fct+side/old"][metric], abs=1e-6)
    assert m["direct"]["top1"][2][1] == m["fct"]["top1"][2][1]  # only v1 -> v3 has its own h
    # the report of the chain carries the version section
    from tests.commands import report_main

    report_main([str(ref), "--out_dir", str(art / "digits"), "--no_wandb"])
    assert "## Model-update chain: v1 -> v2 -> v3" in (art / "digits" / "report.md").read_text()


def test_a_stale_update_is_refused(trained, tmp_path):
    art, plan, _, versions, hs, _ = trained
    from fct_lightning.versions import evaluate_versions

    swapped = dict(hs)
    swapped[(1, 2)] = hs[(0, 1)]  # h(v1 -> v2) standing in for h(v2 -> v3)
    with pytest.raises(ValueError, match="stands on the old checkpoint"):
        evaluate_versions(plan, "digits", art, versions, swapped, device="cpu")


def test_a_failing_run_stops_the_plan_with_what_to_do(tmp_path):
    steps, _, _ = plan_steps(parse_plan(PLAN), "digits", tmp_path)
    with pytest.raises(SystemExit, match="training old failed .*run the same command again"):
        run_steps(steps, runner=lambda argv: 2, log=lambda _: None)
    assert fit_in_subprocess(["--stage", "no_such_stage"]) != 0  # argparse: exit status 2
