"""fct-report: mean and standard deviation over seeds, the compatibility criterion, and the results it refuses
to average (other settings, the same chain evaluated twice)."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import types

import pytest

from fct_lightning.report import make_report
from tests.commands import report_main

META = {"dataset": "digits", "split": "test", "distance": "l2", "n_items": 540}


def results(top1: dict[str, float], digests: str, **meta) -> dict:
    """A results file as fct-eval writes it; every metric of a case equals its top-1 here."""
    cases = {c: {"top1": v, "top5": v, "map": v, "map@r": v} for c, v in top1.items()}
    checkpoints = {s: {"path": f"art/digits/{s}/best.ckpt", "digest": f"{digests}-{s}"} for s in ("old", "new")}
    return {"cases": cases, "missing": {}, "meta": {**META, "checkpoints": checkpoints, **meta}}


def write(path, data, mtime: float | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_mean_and_std_over_seeds_and_compatibility(tmp_path):
    a = write(tmp_path / "seed0.json", results({"old/old": 0.50, "new/old": 0.40, "fct+side/old": 0.70}, "s0"))
    b = write(tmp_path / "seed1.json", results({"old/old": 0.60, "new/old": 0.50, "fct+side/old": 0.80}, "s1"))
    files = make_report([a, b], tmp_path / "out", "t")
    md = files["md"].read_text()
    assert "| old/old | 55.0 ± 7.1 |" in md  # sample std of 50 and 60
    assert "2 run(s) (mean ± std)" in md
    rows = {r["case"]: r for r in csv.DictReader(files["csv"].open())}
    assert float(rows["fct+side/old"]["top1_mean"]) == pytest.approx(0.75)
    assert float(rows["fct+side/old"]["top1_std"]) == pytest.approx(0.0707107, abs=1e-6)
    assert rows["fct+side/old"]["n_runs"] == "2"
    # compatible when the cross-model metric beats old/old's: 75 > 55 yes, 45 < 55 no
    assert (rows["fct+side/old"]["compatible_top1"], rows["new/old"]["compatible_top1"]) == ("yes", "no")
    assert files["png"].is_file()


def test_same_chain_evaluated_twice_counts_once(tmp_path, caplog):
    # make's results/seed0.json and a later fct-eval's results/eval.json of the same checkpoints
    old = write(tmp_path / "seed0.json", results({"old/old": 0.50}, "s0"), mtime=1_000_000)
    new = write(tmp_path / "eval.json", results({"old/old": 0.52}, "s0"), mtime=2_000_000)
    other = write(tmp_path / "seed1.json", results({"old/old": 0.60}, "s1"), mtime=1_500_000)
    with caplog.at_level(logging.WARNING, logger="fct_lightning.report"):
        md = make_report([old, new, other], tmp_path / "out", "t")["md"].read_text()
    assert "| old/old | 56.0 ± 5.7 |" in md  # the newest of the duplicates (52) and seed 1 (60)
    assert "2 run(s)" in md
    assert "same checkpoints" in caplog.text and "SEED=N" in caplog.text and str(old) in caplog.text


def test_backfill_plot_averages_the_seeds(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, lo, hi, **kw: drawn.append((lo, hi)))
    paths = []
    for seed, top1 in ((0, [0.5, 0.9]), (1, [0.7, 0.9])):
        data = results({"old/old": 0.5}, f"s{seed}")
        data["backfill"] = {"fct random": {"checkpoint": f"art/seed{seed}/fct.ckpt", "auc_mean": {"top1": 0.8},
                                           "auc_trapz": {"top1": 0.8}, "fractions": [0.0, 1.0],
                                           "curves": {"top1": top1, "map": top1}}}
        paths.append(write(tmp_path / f"seed{seed}.json", data))
    files = make_report(paths, tmp_path / "out", "t")
    assert files["backfill"].is_file()
    assert drawn[0] == ([50.0, 90.0], [70.0, 90.0])  # the range of the two seeds' curves


def test_a_partial_re_evaluation_counts_its_cases_once(tmp_path, caplog):
    """`fct-eval --cases new/new` of the chain behind seed0.json: its one case replaces seed 0's, nothing is
    counted twice, and the cases it did not evaluate still come from seed 0; backfilling curves likewise."""
    full = results({"old/old": 0.50, "new/new": 0.90}, "s0")
    full["backfill"] = {"fct+side random": {"checkpoint": "art/digits/fastfill/best.ckpt",
                                            "auc_mean": {"top1": 0.8}, "auc_trapz": {"top1": 0.8},
                                            "fractions": [0.0, 1.0], "curves": {"top1": [0.7, 0.9], "map": [0.6, 0.9]}}}
    seed0 = write(tmp_path / "seed0.json", full, mtime=1_000_000)
    again = results({"new/new": 0.91}, "s0")
    again["backfill"] = dict(full["backfill"])
    evaluated = write(tmp_path / "eval.json", again, mtime=2_000_000)
    with caplog.at_level(logging.WARNING, logger="fct_lightning.report"):
        files = make_report([seed0, evaluated], tmp_path / "out", "t")
    rows = {r["case"]: r for r in csv.DictReader(files["csv"].open())}
    assert rows["new/new"]["n_runs"] == "1" and float(rows["new/new"]["top1_mean"]) == pytest.approx(0.91)
    assert rows["old/old"]["n_runs"] == "1" and float(rows["old/old"]["top1_mean"]) == pytest.approx(0.50)
    assert rows["backfill fct+side random (mean AUC)"]["n_runs"] == "1"
    assert "1 run(s)." in files["md"].read_text() and files["backfill"].is_file()
    assert "these numbers: new/new" in caplog.text and str(seed0) in caplog.text


@pytest.mark.parametrize("key,value", [("split", "val"), ("distance", "cosine"), ("n_items", 100),
                                       ("dataset", "cifar10")])
def test_results_of_other_settings_are_refused(tmp_path, key, value, capsys):
    a = write(tmp_path / "r" / "seed0.json", results({"old/old": 0.5}, "s0"))
    b = write(tmp_path / "r" / "seed1.json", results({"old/old": 0.6}, "s1", **{key: value}))
    with pytest.raises(SystemExit, match=f"disagree on the evaluation {key}") as err:
        report_main([str(a), str(b), "--out_dir", str(tmp_path / "out"), "--no_wandb"])
    assert str(b) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_malformed_results_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; run fct-eval first"):
        report_main([str(tmp_path / "none.json"), "--no_wandb"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        report_main([str(bad), "--no_wandb"])
    with pytest.raises(SystemExit, match="no results files in .*empty.*run fct-eval first"):
        report_main(["--artifacts", str(tmp_path / "empty"), "--no_wandb"])


def test_wandb_runs_share_one_project_and_carry_backfill_aucs(tmp_path, monkeypatch):
    """fct-eval / fct-report log into $FCT_WANDB_PROJECT like fct-fit, with names that tell the runs apart."""
    calls = []

    class Run:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            self.summary, self.logged = {}, {}
            calls.append(self)

        def log(self, data):
            self.logged.update(data)

        def finish(self):
            pass

    class Table:
        def __init__(self, columns):
            self.rows = []

        def add_data(self, *row):
            self.rows.append(row)

    fake = types.SimpleNamespace(init=lambda **kw: Run(**kw), Table=Table, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("FCT_WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from fct_lightning.loggers import log_to_wandb

    res = results({"old/old": 0.5}, "s0")
    res["backfill"] = {"fct+side random": {"auc_mean": {"top1": 0.61, "map": 0.42}}}
    log_to_wandb(res, tmp_path, name="digits-eval-seed3")
    kwargs, run = calls
    assert kwargs["project"] == "my-project" and kwargs["name"] == "digits-eval-seed3"
    assert kwargs["group"] == "digits" and kwargs["job_type"] == "eval"
    assert run.summary["old/old/top1"] == 0.5
    assert run.summary["backfill/fct+side random/auc/top1"] == 0.61

    calls.clear()
    write(tmp_path / "art" / "digits" / "results" / "seed0.json", results({"old/old": 0.5}, "s0"))
    report_main(["--artifacts", str(tmp_path / "art")])
    kwargs, run = calls
    assert kwargs["project"] == "my-project" and kwargs["name"] == "digits-report" and kwargs["job_type"] == "report"
    assert kwargs["config"]["n_runs"] == 1


def curve(points: int, value: float, source: str = "transformation", digest: str = "h0") -> dict:
    fractions = [i / (points - 1) for i in range(points)]
    return {"fractions": fractions, "curves": {"top1": [value] * points, "map": [value] * points},
            "auc_mean": {"top1": value},
            "auc_trapz": {"top1": value}, "checkpoint": f"art/digits/{source}/best.ckpt", "digest": digest,
            "source": source}


@pytest.mark.parametrize(("other", "message"), [({"points": 2}, "2 points"),
                                                ({"source": "fastfill"}, "h from fastfill/")])
def test_backfill_curves_of_other_points_or_heads_are_not_averaged(tmp_path, other, message):
    a = dict(results({"old/old": 0.5}, "s0"), backfill={"fct random": curve(22, 0.6, digest="h0")})
    b = dict(results({"old/old": 0.6}, "s1"),
             backfill={"fct random": curve(other.get("points", 22), 0.4, other.get("source", "transformation"), "h1")})
    paths = [write(tmp_path / "seed0.json", a), write(tmp_path / "seed1.json", b)]
    with pytest.raises(SystemExit, match=f"disagree on the backfilling curve 'fct random'.*{message}"):
        report_main([*map(str, paths), "--no_wandb", "--out_dir", str(tmp_path / "out")])


def test_one_chain_evaluated_from_two_paths_counts_its_curves_once(tmp_path):
    """The same h (digest) under art/ and /abs/art/: one chain, counted once for backfilling too."""
    a = dict(results({"old/old": 0.5}, "s0"), backfill={"fct random": curve(22, 0.6)})
    b = dict(results({"old/old": 0.5}, "s0"), backfill={"fct random": dict(curve(22, 0.6), checkpoint="/x/best.ckpt")})
    files = make_report([write(tmp_path / "a.json", a, 1000), write(tmp_path / "b.json", b, 2000)], tmp_path / "o", "t")
    assert "1 run(s)" in files["md"].read_text()


def test_compatibility_is_not_judged_over_different_runs(tmp_path):
    """Seed 1 lacks old/old: fct/old's mean over both seeds against seed 0's old/old is no verdict."""
    a = write(tmp_path / "seed0.json", results({"old/old": 0.80, "fct/old": 0.78}, "s0"))
    b = write(tmp_path / "seed1.json", results({"fct/old": 0.84}, "s1"))
    md = make_report([a, b], tmp_path / "out", "t")["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| fct/old"))
    assert row.rstrip().endswith("|  |  |") and "Fewer runs than 2 for: old/old" in md


def test_report_takes_the_dataset_from_the_files(tmp_path):
    f = write(tmp_path / "r.json", results({"old/old": 0.5}, "s0", dataset="folder"))
    report_main([str(f), "--no_wandb", "--artifacts", str(tmp_path / "art")])
    assert (tmp_path / "art" / "folder" / "report.md").read_text().startswith("# folder: compatibility")
    with pytest.raises(SystemExit, match="--dataset digits, but the results files are of folder"):
        report_main([str(f), "--no_wandb", "--dataset", "digits"])


@pytest.mark.parametrize("cases", [None, 0.5, {"top1": None}, {"top1": "x"}])
def test_edited_results_files_are_named(tmp_path, cases):
    data = results({"old/old": 0.5}, "s0")
    data["cases"]["old/old"] = cases
    f = write(tmp_path / "r.json", data)
    with pytest.raises(SystemExit, match=f"results file {f}: case 'old/old' is not a table of numbers"):
        report_main([str(f), "--no_wandb"])


def test_results_read_from_other_split_folders_are_refused(tmp_path):
    """A folder dataset evaluated on test/ in one file and val/ in another: both say split 'val'."""
    a = write(tmp_path / "seed0.json", results({"old/old": 0.5}, "s0", split_folder="test"))
    b = write(tmp_path / "seed1.json", results({"old/old": 0.6}, "s1", split_folder="val"))
    c = write(tmp_path / "seed2.json", results({"old/old": 0.6}, "s2"))  # an older file, without the field
    with pytest.raises(SystemExit, match="disagree on the evaluation split_folder"):
        report_main([str(a), str(b), "--no_wandb", "--out_dir", str(tmp_path / "out")])
    assert "2 run(s)" in make_report([a, c], tmp_path / "out", "t")["md"].read_text()


def test_metrics_through_an_index_are_reported_beside_the_exact_ones(tmp_path):
    """fct-eval --index on stores adds index/<metric> to each case: the table and the CSV gain those columns (and
    only when a result has them)."""
    data = results({"old/old": 0.50, "fct+side/old": 0.70}, "s0")
    data["cases"]["fct+side/old"].update({"index/top1": 0.65, "index/top5": 0.9, "index/map@r": 0.4})
    files = make_report([write(tmp_path / "r.json", data)], tmp_path / "out", "t")
    md = files["md"].read_text()
    assert "| case | top-1 | top-5 | mAP | mAP@R | top-1 (index) | top-5 (index) | mAP@R (index) |" in md
    assert "| fct+side/old | 70.0 | 70.0 | 70.0 | 70.0 | 65.0 | 90.0 | 40.0 |" in md
    rows = {r["case"]: r for r in csv.DictReader(files["csv"].open())}
    assert float(rows["fct+side/old"]["index/map@r_mean"]) == pytest.approx(0.4)
    assert rows["old/old"]["index/top1_mean"] == ""
    plain = make_report([write(tmp_path / "p.json", results({"old/old": 0.5}, "s1"))], tmp_path / "out2", "t")
    assert "(index)" not in plain["md"].read_text()
