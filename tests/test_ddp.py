"""Multi-process CPU DDP (gloo), always in subprocesses: strategy=ddp inside pytest would re-run pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp
SCRIPTS = Path(__file__).parent / "scripts"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_callback_is_exact_for_1_2_3_ranks(tmp_path):
    results = {}
    for n in (1, 2, 3):
        out = tmp_path / f"m{n}.json"
        _run([sys.executable, str(SCRIPTS / "ddp_validate.py"), "--devices", str(n), "--out", str(out)], tmp_path)
        results[n] = json.loads(out.read_text())
    assert set(results[1]) == {f"val/{c}/{m}" for c in ("a/a", "b/a") for m in ("top1", "top5", "map", "map@r")}
    assert results[2] == results[1]
    assert results[3] == results[1]


FIT = [sys.executable, "-m", "fct_lightning.commands.fit", "--dataset", "digits", "--trainer.accelerator", "cpu",
       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
       "--trainer.limit_train_batches", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
       "--model.width", "8"]


def test_fct_fit_two_process_ddp_chain(tmp_path):
    from fct_lightning.commands.fit import fit

    art = str(tmp_path / "art")
    _run([*FIT, "--stage", "old", "--artifacts", art], tmp_path)
    for stage in ("side_info", "new"):  # single-process, to keep the test short
        fit(["--stage", stage, "--artifacts", art, *FIT[FIT.index("--trainer.max_epochs"):]])
    _run([*FIT[:-2], "--stage", "transformation", "--artifacts", art, "--model.mixer_width", "64",
          "--model.cache_views", "2"], tmp_path)
    for stage in ("old", "side_info", "new", "transformation"):
        assert (tmp_path / "art" / "digits" / stage / "best.ckpt").is_file(), stage
        assert (tmp_path / "art" / "digits" / stage / "done.json").is_file(), stage  # rank 0 wrote it once
    caches = list((tmp_path / "art" / "digits" / "cache").glob("*/features.pt"))
    assert len(caches) == 1 and not list((tmp_path / "art" / "digits" / "cache").glob("*/part-*"))


def test_callback_names_diverged_embeddings():
    import torch

    from fct_lightning.retrieval.callback import RetrievalEvaluation

    emb = torch.randn(6, 4)
    emb[2, 1] = float("nan")
    gathered = {"index": torch.arange(6), "labels": torch.zeros(6, dtype=torch.long), "emb:bct": emb}
    with pytest.raises(FloatingPointError, match="1 of 6 validation embeddings of space 'bct' are NaN"):
        RetrievalEvaluation().compute(gathered, {"bct/bct": ("bct", "bct")})


def test_an_evaluation_error_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 computes the metrics; when it fails (here: a NaN embedding), every rank stops with the same clear
    error. Before, the other ranks waited in the broadcast: with gloo they died of "connection closed by peer",
    with NCCL they could wait until the process-group timeout."""
    cmd = [sys.executable, str(SCRIPTS / "ddp_validate.py"), "--devices", "2", "--out", str(tmp_path / "m.json"),
           "--nan_item", "50"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("validation embeddings of space 'b' are NaN") >= 2, proc.stderr[-3000:]



def test_ddp_spawn_reports_the_epochs_and_score_of_the_spawned_run(tmp_path):
    """Under ddp_spawn the launching process does not train: done.json reads the outcome back from last.ckpt."""
    spawn = [*FIT[:FIT.index("ddp")], "ddp_spawn", *FIT[FIT.index("ddp") + 1:]]
    spawn[spawn.index("--trainer.max_epochs") + 1] = "2"
    proc = _run([*spawn, "--stage", "old", "--artifacts", str(tmp_path / "art")], tmp_path)
    done = json.loads((tmp_path / "art" / "digits" / "old" / "done.json").read_text())
    assert done["epochs"] == 2 and done["best"] is not None
    assert "(2 epochs)" in proc.stderr + proc.stdout
