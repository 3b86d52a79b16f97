"""W&B is the default logger; with no credentials it goes offline by itself, never prompts or fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fct_lightning.loggers import ensure_wandb_mode, wandb_has_credentials


def test_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not wandb_has_credentials()
    assert ensure_wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_explicit_mode_is_kept(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ensure_wandb_mode() == "disabled"


def test_private_server_credentials_are_found(monkeypatch, tmp_path):
    """`wandb login --host` stores the key under the server's host in ~/.netrc."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / ".netrc").write_text("machine wandb.example.com\n  login user\n  password abc123\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8443")
    assert wandb_has_credentials()
    monkeypatch.delenv("WANDB_BASE_URL")
    assert not wandb_has_credentials()  # the key is not api.wandb.ai's


@pytest.mark.parametrize("explicit", [False, True])
def test_fct_fit_logs_an_offline_wandb_run(tmp_path, explicit):
    """The default logger and one chosen with --trainer.logger WandbLogger both go offline without credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / ".netrc"), OMP_NUM_THREADS="1")
    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "fct_lightning.commands.fit", "--stage", "old", "--artifacts", str(art),
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
           "--model.width", "8"]
    if explicit:
        cmd += ["--trainer.logger", "WandbLogger", "--trainer.logger.save_dir", str(art)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("No W&B credentials found: logging offline") == 1
    assert "--trainer.logger false" in proc.stderr
    runs = list((art / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (art / "digits" / "old" / "best.ckpt").is_file()


def test_run_names_tell_variants_and_seeds_apart(monkeypatch, tmp_path):
    """One project for every run; name = dataset, stage variant (artifacts folder) and the run's --seed."""
    from fct_lightning.commands.fit import build_cli
    from fct_lightning.loggers import default_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("FCT_WANDB_PROJECT", "my-project")
    cli, _ = build_cli(["--stage", "old", "--seed", "3", "--artifacts", str(tmp_path), "--model.width", "4"])
    init = cli.trainer.logger._wandb_init
    assert (init["project"], init["group"], init["job_type"], init["name"]) == ("my-project", "digits", "old",
                                                                                  "digits-old-seed3")
    names = {default_logger("digits", "transformation", tmp_path, 0, v)._wandb_init["name"]
             for v in ("transformation", "transformation_noside", "fastfill", "fastfill_noside")}
    assert len(names) == 4 and "digits-fastfill_noside-seed0" in names


def test_a_seeded_run_logs_the_side_info_stage(monkeypatch, tmp_path):
    """--seed 1 sets data.seed 1; the side-info model's projection seed once shared that name, and Lightning refused
    to log two hyperparameters ``seed`` of different values (every side_info run of `make <dataset> SEED=1`)."""
    from fct_lightning.commands.fit import fit

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = fit(["--stage", "side_info", "--seed", "1", "--artifacts", str(tmp_path), "--model.width", "4",
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
               "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.logger is not None and cli.datamodule.hparams["seed"] == 1
    assert (tmp_path / "digits" / "side_info" / "best.ckpt").is_file()
