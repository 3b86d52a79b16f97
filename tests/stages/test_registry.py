"""The chain registry drives fct-fit, fct-eval and fct-report: a throwaway variant registered in a test is trained,
evaluated and reported with no other edit; --resume auto follows the one start policy in runs.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fct_lightning import chain
from fct_lightning.commands.fit import build_cli
from fct_lightning.runs import start_mode
from tests.commands import eval_main, fit_main, report_main
from tests.stages.test_chain import SMALL_H, SMALL_NET, run

TINY_H = {"use_side_info": True, "uncertainty": False, "mixer_width": 32}


@pytest.fixture
def throwaway():
    variant = chain.register(chain.Variant(
        "transformation_tiny", "transformation", TINY_H, upstream=("old", "side_info", "new"),
        spaces=(chain.Space("fct-tiny", "gallery"),),
        cases=(chain.Case("fct-tiny/old", "new", "fct-tiny", cross=True),), seed_offset=7))
    yield variant
    chain.unregister(variant.name)


def test_a_registered_variant_is_trained_evaluated_and_reported(chain_dir, throwaway, capsys):
    cli = run("transformation_tiny", chain_dir, "--model.cache_views", "2")
    assert cli.out_dir == chain_dir / "digits" / "transformation_tiny"
    assert cli.model.hparams["mixer_width"] == 32 and cli.model.h.config["mixer_width"] == 32
    assert (cli.out_dir / "best.ckpt").is_file() and (cli.out_dir / "done.json").is_file()
    out = chain_dir / "digits" / "results" / "tiny.json"
    eval_main(["--artifacts", str(chain_dir), "--no_wandb", "--cases", "old/old,new/new,fct-tiny/old",
               "--out", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"old/old", "new/new", "fct-tiny/old"}
    report_main([str(out), "--out_dir", str(chain_dir / "tiny_report"), "--no_wandb"])
    table = (chain_dir / "tiny_report" / "report.md").read_text()
    assert "fct-tiny/old" in table
    assert table.index("new/new") < table.index("fct-tiny/old")  # after the registry's built-in cases


def test_variant_options_win_over_configs_and_clash_with_the_users(chain_dir, tmp_path):
    """A recipe may set use_side_info: true; --stage transformation_noside still trains h(old), and an option that
    contradicts the variant is an error, not silently lost."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  use_side_info: true\n")
    cli, _ = build_cli(["--stage", "transformation_noside", "--artifacts", str(chain_dir), "--config", str(recipe),
                        "--trainer.logger", "false", *SMALL_H])
    assert cli.model.use_side_info is False and cli.out_dir.name == "transformation_noside"
    with pytest.raises(SystemExit, match="--stage transformation_noside sets --model.use_side_info itself"):
        fit_main(["--stage", "transformation_noside", "--artifacts", str(chain_dir), "--model.use_side_info", "true"])
    # the plain stage plus options picks the variant as before
    cli, _ = build_cli(["--stage", "transformation", "--artifacts", str(chain_dir), "--model.uncertainty", "true",
                        "--trainer.logger", "false", *SMALL_H])
    assert cli.out_dir.name == "fastfill"


def _touch(path: Path, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (time.time() - age, time.time() - age))


def test_start_policy(tmp_path):
    up, out = tmp_path / "new", tmp_path / "h"
    _touch(up / "best.ckpt", 100)
    assert start_mode(out, [up / "best.ckpt"])[0] == "fresh"  # nothing yet
    _touch(out / "last.ckpt", 50)
    assert start_mode(out, [up / "best.ckpt"])[0] == "resume"  # interrupted after its upstream was made
    _touch(up / "done.json", 10)  # the upstream finished (re-trained) after the interrupted run's last epoch
    assert start_mode(out, [up / "best.ckpt"])[0] == "fresh"
    _touch(out / "done.json", 5)
    assert start_mode(out, [up / "best.ckpt"])[0] == "skip"
    _touch(up / "done.json", 1)  # re-trained again: the finished stage is outdated
    mode, why = start_mode(out, [up / "best.ckpt"])
    assert mode == "fresh" and "newer" in why


def test_resume_auto_skips_a_finished_run_and_resumes_an_interrupted_one(tmp_path, caplog):
    base = ["--stage", "old", "--artifacts", str(tmp_path), *SMALL_NET, "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    fit_main([*base, "--resume", "auto"])
    folder = tmp_path / "digits" / "old"
    done = (folder / "done.json").stat().st_mtime_ns
    best = (folder / "best.ckpt").read_bytes()
    fit_main([*base, "--resume", "auto"])  # finished and current: nothing changes
    assert (folder / "done.json").stat().st_mtime_ns == done and (folder / "best.ckpt").read_bytes() == best
    (folder / "done.json").unlink()  # as if killed after the last checkpoint: resumed, nothing trained again
    fit_main([*base, "--resume", "auto"])
    assert (folder / "done.json").is_file() and (folder / "best.ckpt").read_bytes() == best
    with pytest.raises(SystemExit, match="--resume auto decides by itself"):
        fit_main([*base, "--resume", "auto", "--overwrite"])


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("registry")
    for stage in ("old", "side_info", "new"):
        run(stage, art, *SMALL_NET)
    return art
