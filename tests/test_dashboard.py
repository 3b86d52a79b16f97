"""The W&B dashboard as code: built offline from a tiny chain's results, every panel names keys those runs log."""

from __future__ import annotations

import json

import pytest
import torch

from fct_lightning.dashboard import build_workspace, dashboard_sections, panel_keys, publish, workspace_spec
from fct_lightning.loggers import GRID_MEDIA, GRID_TABLE, VERSIONS_HEATMAP, versions_summary
from fct_lightning.versions import matrices, scores
from tests.commands import eval_main, report_main
from tests.stages.test_chain import SMALL_H, SMALL_NET, run

pytest.importorskip("wandb_workspaces")
wandb = pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    """A tiny chain; per variant, the keys its training run logged."""
    art = tmp_path_factory.mktemp("dash")
    logged = set()
    for stage, extra in (("old", SMALL_NET), ("side_info", SMALL_NET), ("new", SMALL_NET), ("bct", SMALL_NET),
                         ("transformation", SMALL_H), ("transformation_noside", SMALL_H), ("fastfill", SMALL_H)):
        cli = run(stage, art, *extra)
        logged |= set(cli.trainer.logged_metrics) | set(cli.trainer.callback_metrics)
    out = art / "digits" / "results" / "seed0.json"
    runs: list[_Run] = []
    with pytest.MonkeyPatch.context() as mp:  # the eval run's W&B calls, recorded (its real Tables and Images)
        mp.setenv("WANDB_MODE", "offline")
        mp.setattr(wandb, "init", lambda **kw: runs.append(_Run()) or runs[-1])
        eval_main(["--artifacts", str(art), "--device", "cpu", "--backfill", "random,uncertainty", "--points", "3",
                   "--out", str(out)])
    (eval_run,) = runs
    return art, json.loads(out.read_text()), logged, eval_run


class _Run:
    """What a W&B run was given: the keys of every ``log`` (and the values), the summary, whether it finished."""

    def __init__(self) -> None:
        self.logged: dict[str, object] = {}
        self.summary: dict[str, object] = {}
        self.finished = False

    def log(self, row: dict) -> None:
        self.logged.update(row)

    def finish(self) -> None:
        self.finished = True


def _versions_results():
    labels = torch.arange(4).repeat_interleave(5)
    feats = [torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(20, 4) for _ in range(3)]

    class Same:
        def transform(self, old, side=None):
            return old

    got = matrices(feats, None, labels, {(0, 1): Same(), (1, 2): Same(), (0, 2): Same()})
    return {"versions": [{"name": n} for n in ("v1", "v2", "v3")], "matrices": got,
            "scores": {k: scores(m) for k, m in got.items()}}


def test_every_panel_names_a_key_the_runs_log(chain_runs):
    art, results, trained, run = chain_runs
    versions = _versions_results()
    sections = dashboard_sections(results, versions)
    assert results["grid"] == "seed0-grid.png" and (art / "digits" / "results" / results["grid"]).is_file()
    assert run.finished and isinstance(run.logged[GRID_MEDIA], wandb.Image)
    # the grid after a backfilling round (10%, the first deterministic policy given): a row in picture and table
    backfilled = "new/fct+side, 10% backfilled (uncertainty)"
    assert results["grid_cases"] == ["old/old", "new/old", "fct+side/old", "new/new", backfilled]
    table = run.logged[GRID_TABLE]
    assert isinstance(table, wandb.Table) and len(table.data) == 6 * 5  # 6 queries x 5 cases
    assert {r[2] for r in table.data} == set(results["grid_cases"])
    logged = trained | set(run.logged) | set(run.summary) | set(versions_summary(versions)) | {VERSIONS_HEATMAP}
    keys = panel_keys(sections)
    assert keys <= logged, sorted(keys - logged)
    # what the dashboard promises: bars with the floor and ceiling, BCT and FCT curves, backfilling, the matrix
    assert {"old/old/top1", "new/new/top1", "bct/old/top1", "fct+side/old/top1", "fct/old/top1"} <= keys
    assert {"val/bct/old/map", "val/fct+side/old/map", "val/fct/old/map"} <= keys
    assert {"backfill/fct+side uncertainty/top1", "backfill/fraction", "versions/fct/top1/am", GRID_MEDIA,
            GRID_TABLE} <= keys
    bars = sections[0].panels[0].keys
    assert bars[:2] == ("old/old/top1", "new/new/top1")  # floor and ceiling first
    assert all(p.groupby == "stage" for s in sections if s.name.startswith("Training") for p in s.panels)


def test_the_spec_is_written_offline_and_says_how_to_publish(chain_runs, tmp_path, capsys, monkeypatch):
    art, results, _, _ = chain_runs
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    sections = dashboard_sections(results)
    message, path = publish(sections, tmp_path / "dashboard.json", "digits", entity="someone")
    assert "no W&B credentials" in message and "--dashboard --entity" in message
    spec = json.loads(path.read_text())
    assert spec["keys"] == sorted(panel_keys(sections))
    text = json.dumps(spec["workspace"])
    assert spec["workspace"]["project"] == "fct-lightning" and "val/fct+side/old/map" in text
    views = [p["viewType"] for s in spec["workspace"]["spec"]["section"]["panelBankConfig"]["sections"]
             for p in s["panels"]]
    assert "Bar Chart" in views and "Run History Line Plot" in views and "Weave" in views
    workspace = build_workspace(sections, "e", "p", "n")
    assert workspace_spec(workspace)["entity"] == "e"
    # through fct-report
    report_main(["--artifacts", str(art), "--no_wandb", "--dashboard"])
    assert "no --entity given" in capsys.readouterr().out
    assert (art / "digits" / "dashboard.json").is_file()
    assert "## Retrieval grid" in (art / "digits" / "report.md").read_text()
    assert "(results/seed0-grid.png)" in (art / "digits" / "report.md").read_text()
