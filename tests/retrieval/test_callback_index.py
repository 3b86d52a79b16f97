"""RetrievalEvaluation's metrics through a FAISS index: logged next to the exact ones, equal to them under Flat with
one and two ranks, settable from the fct-fit command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages.base import RetrievalStage

pytest.importorskip("faiss")
SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_validate.py"
METRICS = ("top1", "top5", "map@r")


class IndexToy(RetrievalStage):
    """Two fixed linear embeddings of the inputs: a same-space case and a cross-space one."""

    stage = "toy_index"

    def __init__(self) -> None:
        super().__init__(dataset="toy")
        g = torch.Generator().manual_seed(1)
        self.register_buffer("a", torch.randn(12, 6, generator=g))
        self.register_buffer("b", torch.randn(12, 6, generator=g))

    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {"b/a": ("b", "a"), "a/a": ("a", "a")}

    def eval_embeddings(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": x @ self.a, "b": x @ self.b + 0.5 * x @ self.a}


def _validate(callback: RetrievalEvaluation) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 12, generator=g)[torch.randint(30, (90,), generator=g)]  # duplicates: exact ties
    y = torch.randint(4, (90,), generator=g)
    loader = DataLoader(TensorDataset(x, y, torch.arange(90)), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(IndexToy(), loader, verbose=False)[0].items()}


def test_index_metrics_are_logged_next_to_the_exact_ones() -> None:
    callback = RetrievalEvaluation()
    logged = _validate(callback)
    for case in ("a/a", "b/a"):
        for m in METRICS:
            assert logged[f"val/{case}/index/{m}"] == logged[f"val/{case}/{m}"], (case, m)
        assert f"val/{case}/index/map" not in logged  # full-ranking mAP has no index counterpart
    assert logged["val/index_seconds"] == pytest.approx(callback.index_seconds) and callback.index_seconds > 0
    assert set(callback.results["a/a"]) == {"top1", "top5", "map", "map@r"}  # what fct-fit's summary prints
    for case, exact in callback.results.items():  # float64, before logging rounds them to float32
        assert callback.index_results[case] == {m: exact[m] for m in METRICS}


def test_an_approximate_index_and_none() -> None:
    logged = _validate(RetrievalEvaluation(index="IVF2,Flat", index_nprobe=1))
    assert {f"val/b/a/index/{m}" for m in METRICS} <= set(logged)
    off = _validate(RetrievalEvaluation(index="none"))
    assert not [k for k in off if "index" in k]
    assert {k: v for k, v in logged.items() if "index" not in k} == off  # the exact metrics do not change
    with pytest.raises(ValueError, match="index_nprobe=0 must be a positive integer"):
        RetrievalEvaluation(index_nprobe=0)


def test_the_options_reach_the_callback_from_the_command_line() -> None:
    from pytorch_lightning.cli import LightningArgumentParser

    parser = LightningArgumentParser()
    parser.add_class_arguments(RetrievalEvaluation, "retrieval", fail_untyped=True)  # as fct-fit does
    cfg = parser.parse_args(["--retrieval.index", "IVF64,Flat", "--retrieval.index_nprobe", "4"])
    assert cfg.retrieval.index == "IVF64,Flat" and cfg.retrieval.index_nprobe == 4
    assert RetrievalEvaluation(**vars(parser.parse_args(["--retrieval.index", "none"]).retrieval)).index is None
    assert parser.parse_args([]).retrieval.index == "Flat"


@pytest.mark.ddp
def test_flat_index_metrics_equal_the_exact_ones_on_1_and_2_ranks(tmp_path: Path, monkeypatch) -> None:
    """Two gloo processes (a subprocess: strategy=ddp inside pytest would re-run pytest), one in-process run of the
    same script; 101 items padded by DistributedSampler, duplicated embeddings (exact ties)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    args = ["--index", "Flat", "--ties"]
    two = tmp_path / "m2.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", "2", "--out", str(two), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("ddp_validate", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    one = tmp_path / "m1.json"
    monkeypatch.setattr(sys, "argv", ["ddp_validate.py", "--devices", "1", "--out", str(one), *args])
    script.main()
    results = {n: json.loads(path.read_text()) for n, path in ((1, one), (2, two))}
    for n, logged in results.items():
        for case in ("a/a", "b/a"):
            for m in METRICS:
                assert logged[f"val/{case}/index/{m}"] == logged[f"val/{case}/{m}"], (n, case, m)
        assert logged.pop("val/index_seconds") > 0
    assert results[2] == results[1]
