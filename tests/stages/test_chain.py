"""Every stage fits on tiny digits through fct-fit, in chain order, then fct-eval and fct-report read them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from fct_lightning.commands.fit import build_cli, fit
from fct_lightning.models.adapters import backward
from fct_lightning.stages import load_h, load_stage
from fct_lightning.stages.checkpoints import CheckpointError, read_checkpoint
from tests.commands import eval_main, fit_main, report_main

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
SMALL_NET = ["--model.width", "8"]
SMALL_H = ["--model.mixer_width", "64", "--model.cache_views", "2"]
CLOSED_FORM = {"linear": "linear+side/old", "linear_noside": "linear/old", "procrustes": "procrustes/old"}
ORTHOGONAL = {"orthogonal": ("new/F", "B/old"), "orthogonal_side": ("new/F+side",)}  # fct-eval's cases of the adapters
ORTHOGONAL_CASES = tuple(c for cases in ORTHOGONAL.values() for c in cases)
REPLACE = ["--overwrite"]  # the module's chain may already hold the stage these runs would write


def run(stage: str, artifacts: Path, *extra: str):
    return fit(["--stage", stage, "--artifacts", str(artifacts), *TINY, *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("artifacts")
    run("old", art, *SMALL_NET)
    run("side_info", art, *SMALL_NET)
    run("new", art, *SMALL_NET)
    return art


@pytest.fixture(scope="module")
def full_chain(chain) -> Path:
    cli = run("transformation", chain, *SMALL_H)
    assert "val/fct+side/old/top1" in cli.trainer.callback_metrics
    run("transformation", chain, *SMALL_H, "--model.use_side_info", "false")
    run("bct", chain, *SMALL_NET)
    for variant in CLOSED_FORM:  # solved from the transformation's feature cache (same cache_views): seconds each
        run(variant, chain, "--model.cache_views", "2", "--retrieval.index", "none")
    for variant in ORTHOGONAL:  # F and B trained on the same cache, F linear: seconds each
        run(variant, chain, *SMALL_H, "--model.forward_kind", "linear", "--retrieval.index", "none")
    return chain


def test_upstream_stages_write_artifacts(chain):
    for stage in ("old", "side_info", "new"):
        folder = chain / "digits" / stage
        assert {"best.ckpt", "last.ckpt", "config.yaml"} <= {p.name for p in folder.iterdir()}
        meta = read_checkpoint(folder / "best.ckpt", stage)["fct"]
        assert meta["stage"] == stage and meta["dataset"] == "digits" and meta["embedding_dim"] == 128
        assert meta["val_fraction"] == 0.1  # configs/digits/data.yaml: selection on the held-out training items
    assert read_checkpoint(chain / "digits" / "old" / "best.ckpt", "old")["fct"]["classes"] == [0, 1, 2, 3, 4]
    assert read_checkpoint(chain / "digits" / "new" / "best.ckpt", "new")["fct"]["classes"] == list(range(10))
    cfg = (chain / "digits" / "old" / "config.yaml").read_text()
    assert "train_classes: 5" in cfg and "backbone: convnet" in cfg


def test_transformation_bct_eval_report(full_chain, capsys):
    chain = full_chain
    assert (chain / "digits" / "cache").is_dir()
    for folder in ("transformation", "transformation_noside", "bct", *CLOSED_FORM, *ORTHOGONAL):
        assert (chain / "digits" / folder / "best.ckpt").is_file()
    # the transformation checkpoints do not duplicate the frozen models' weights (a closed-form one adds the
    # statistics its map was solved from)
    state = read_checkpoint(chain / "digits" / "transformation" / "best.ckpt", "transformation")["state_dict"]
    assert state and all(k.startswith("h.") for k in state)
    for folder in CLOSED_FORM:
        state = read_checkpoint(chain / "digits" / folder / "best.ckpt", "transformation")["state_dict"]
        assert {k for k in state if not k.startswith("h.")} == {"moments_gram", "moments_cross"}
    eval_main(["--artifacts", str(chain), "--no_wandb"])
    results = json.loads((chain / "digits" / "results" / "eval.json").read_text())
    assert set(results["cases"]) == {"old/old", "new/new", "new/old", "bct/old", "bct/bct", "fct/old", "fct+side/old",
                                     *CLOSED_FORM.values(), *ORTHOGONAL_CASES}
    assert results["missing"] == {}
    for metrics in results["cases"].values():
        assert set(metrics) == {"top1", "top5", "map", "map@r"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    report_main(["--artifacts", str(chain), "--no_wandb"])
    out = capsys.readouterr().out
    assert all(f"| {case} |" in out for case in ("fct+side/old", *CLOSED_FORM.values(), *ORTHOGONAL_CASES))
    assert (chain / "digits" / "report.png").is_file()


def test_eval_shares_image_models_between_spaces(full_chain):
    """fct-eval runs each checkpoint's model once per batch; the shared features give what each space gives alone."""
    from fct_lightning import evaluation

    results = evaluation.run_eval("digits", full_chain)
    embs, labels = results["_embeddings"]
    dm, dev = results["_datamodule"], results["_device"]
    assert len(results["_features"]) == 4  # old, side_info, new, bct: fct and fct+side reuse old and side_info, B new
    embedders, _ = evaluation.load_spaces(full_chain, "digits", set(embs))
    with torch.no_grad():
        for space, (module, fn, _) in embedders.items():
            module.eval()
            alone = torch.cat([fn(x.to(dev)).float() for x, _, _ in dm.eval_dataloader(dm.eval_split)])
            torch.testing.assert_close(embs[space], alone)
    # B, a query space of a stage on frozen models, is B applied to the new model's embeddings (not F(old))
    h, _ = load_h(full_chain / "digits" / "orthogonal" / "best.ckpt")
    torch.testing.assert_close(embs["B"], backward(h.to(dev), embs["new"]))
    assert embs["B"].shape == embs["old"].shape and not torch.allclose(embs["B"], embs["F"])
    # backfilling from the stored features = backfilling that reads the images again
    kwargs = {"policies": ["random", "distance"], "points": 3, "seeds": 1, "distance": "l2"}
    shared = evaluation.run_backfill(full_chain, dm, dev, **kwargs, features=results["_features"], labels=labels)
    again = evaluation.run_backfill(full_chain, dm, dev, **kwargs)
    assert set(shared) == set(again) == {"fct+side random", "fct+side distance", "fct random", "fct distance"}
    for key, curve in shared.items():
        for metric, values in curve["curves"].items():
            assert values == pytest.approx(again[key]["curves"][metric], abs=1e-3)
    # separate queries embedded by another new model than the one h was trained with: refused, also without the
    # chain's metadata to compare with
    new_emb = embs["new"]
    with pytest.raises(CheckpointError, match="separate queries' new model is now 0123456789abcdef"):
        evaluation.run_backfill(full_chain, dm, dev, **kwargs, queries=(new_emb, labels, "0123456789abcdef"))


def test_eval_reports_missing_cases(tmp_path, capsys):
    art = tmp_path / "art"
    run("old", art, *SMALL_NET)
    results = eval_main(["--artifacts", str(art), "--no_wandb", "--cases", "old/old,new/old,fct+side/old"])
    assert set(results["cases"]) == {"old/old"}
    assert set(results["missing"]) == {"new/old", "fct+side/old"}
    assert "missing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--batch_size 0 must be at least 1"):
        eval_main(["--artifacts", str(art), "--no_wandb", "--batch_size", "0"])


def test_resume_continues_epoch_count(tmp_path):
    art = tmp_path / "art"
    run("old", art, *SMALL_NET)
    assert read_checkpoint(art / "digits" / "old" / "last.ckpt", "old")["epoch"] == 0
    cli = fit(["--stage", "old", "--artifacts", str(art), *TINY, *SMALL_NET, "--trainer.max_epochs", "2",
               "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2
    assert read_checkpoint(art / "digits" / "old" / "last.ckpt", "old")["epoch"] == 1


def test_last_checkpoint_is_the_last_epoch_not_the_best(tmp_path):
    """Validating every 2nd of 3 epochs, the best is saved at epoch 1; last.ckpt must still be epoch 2 (Lightning's
    save_last wrote it only next to a best one, so a resume went back to the best epoch and trained again)."""
    art = tmp_path / "art"
    run("old", art, *SMALL_NET, "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2")
    folder = art / "digits" / "old"
    assert read_checkpoint(folder / "best.ckpt", "old")["epoch"] == 1
    last = read_checkpoint(folder / "last.ckpt", "old")
    assert last["epoch"] == 2 and last["global_step"] == 6
    # resuming the finished run trains nothing and changes nothing
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    cli = fit(["--stage", "old", "--artifacts", str(art), *TINY, *SMALL_NET, "--trainer.max_epochs", "3",
               "--trainer.check_val_every_n_epoch", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 0 and {f.name: f.read_bytes() for f in folder.iterdir()} == before
    # killed after its last checkpoint but before done.json: the resume writes done.json (make's target) only
    done = json.loads((folder / "done.json").read_text())
    (folder / "done.json").unlink()
    fit(["--stage", "old", "--artifacts", str(art), *TINY, *SMALL_NET, "--trainer.max_epochs", "3",
         "--trainer.check_val_every_n_epoch", "2", "--ckpt_path", "last"])
    again = json.loads((folder / "done.json").read_text())
    assert (again["epochs"], again["best"]) == (done["epochs"], pytest.approx(done["best"]))
    assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name != "done.json"} == {
        k: v for k, v in before.items() if k != "done.json"}


def test_sigterm_ends_with_an_error_and_no_done_file(tmp_path):
    """A scheduler's SIGTERM stopped the run with exit status 0 (Lightning's SIGTERMException is a SystemExit), and
    `make` went on to train the next stage on an unfinished checkpoint."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fct_lightning.commands.fit", "--stage", "old", "--artifacts", str(tmp_path), *TINY,
           *SMALL_NET, "--trainer.max_epochs", "3", "--trainer.callbacks+=tests.stages.signals.SigtermAt"]
    res = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "stopped by SIGTERM" in res.stderr and "--ckpt_path last" in res.stderr
    assert not (tmp_path / "digits" / "old" / "done.json").exists()


def test_a_users_checkpoint_callback_is_announced(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fct_lightning.commands.fit"):
        cli, _ = build_cli(["--stage", "old", "--artifacts", str(tmp_path), *TINY, *SMALL_NET,
                            "--trainer.callbacks+=ModelCheckpoint"])
    assert "adds none of its own" in caplog.text and "filename=best" in caplog.text
    assert sum(isinstance(c, pl.callbacks.ModelCheckpoint) for c in cli.trainer.callbacks) == 1


def test_resume_in_a_copied_folder_keeps_the_better_best(tmp_path):
    """A copied stage folder's resume must compare with the best score it carries, not start the race anew."""
    art = tmp_path / "art"
    run("old", art, *SMALL_NET)
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    last = copy / "digits" / "old" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    states = [v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/" in k]
    assert len(states) == 1 and states[0]["dirpath"] == str(art / "digits" / "old")
    # the score to beat, as the callback keeps it (mAP is at most 1: no validation can beat it)
    states[0].update(best_model_score=torch.tensor(2.0), kth_value=torch.tensor(2.0),
                     best_k_models={k: torch.tensor(2.0) for k in states[0]["best_k_models"]})
    torch.save(ckpt, last)
    best = (copy / "digits" / "old" / "best.ckpt").read_bytes()
    cli = fit(["--stage", "old", "--artifacts", str(copy), *TINY, *SMALL_NET, "--trainer.max_epochs", "2",
               "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2 and (copy / "digits" / "old" / "best.ckpt").read_bytes() == best
    assert cli.trainer.checkpoint_callback.best_model_path == str(copy / "digits" / "old" / "best.ckpt")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="cannot resume"):
        fit_main(["--stage", "old", "--artifacts", str(tmp_path), *TINY, "--ckpt_path", "last"])


def test_wrong_checkpoint_for_role(chain, tmp_path):
    new = chain / "digits" / "new" / "best.ckpt"
    with pytest.raises(ValueError, match="old_checkpoint and new_checkpoint are the same file"):
        run("transformation", chain, *SMALL_H, *REPLACE, "--model.old_checkpoint", str(new))
    side = chain / "digits" / "side_info" / "best.ckpt"
    with pytest.raises(CheckpointError, match="'side_info' checkpoint but the old role needs a old or new checkpoint"):
        run("transformation", chain, *SMALL_H, *REPLACE, "--model.old_checkpoint", str(side))
    with pytest.raises(CheckpointError, match="does not exist"):
        run("transformation", chain, *SMALL_H, *REPLACE, "--model.side_info_checkpoint", str(tmp_path / "nope.ckpt"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run("bct", chain, *SMALL_NET, *REPLACE, "--model.old_checkpoint", str(corrupt))


def test_dataset_and_dimension_mismatch(chain, tmp_path):
    ckpt = torch.load(chain / "digits" / "old" / "best.ckpt", weights_only=False)
    ckpt["fct"]["dataset"] = "cifar10"
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match="trained on dataset 'cifar10' but this run uses 'digits'"):
        run("transformation", chain, *SMALL_H, *REPLACE, "--model.old_checkpoint", str(other))
    with pytest.raises(CheckpointError, match="dimension mismatch"):
        run("bct", chain, *SMALL_NET, *REPLACE, "--model.embedding_dim", "64")
    # runs that fail in set-up leave the stages' folders as they were, --overwrite or not
    assert not list((chain / "digits").glob("*/*.replaced.ckpt"))


def test_upstream_with_another_holdout_is_refused(chain):
    """h validated on items its old model trained on would be selected on flattering numbers."""
    with pytest.raises(CheckpointError, match=r"val_fraction=0.1 of the training images held out for validation, "
                                              r"this run with 0.*--data.val_fraction 0.1"):
        run("transformation", chain, *SMALL_H, *REPLACE, "--data.val_fraction", "0")
    assert not list((chain / "digits").glob("*/*.replaced.ckpt"))


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(FloatingPointError, match="NaN"):
        run("old", tmp_path, *SMALL_NET, "--model.lr", "1e30", "--trainer.limit_train_batches", "5",
            "--model.warmup_epochs", "0")


def test_ckpt_path_from_another_folder_does_not_replace_checkpoints(chain, tmp_path):
    """Starting a run from another folder's checkpoint writes into this folder: like a fresh run, it is refused
    where checkpoints exist, and --overwrite keeps them aside."""
    art = tmp_path / "art"
    run("old", art, *SMALL_NET)
    mine = art / "digits" / "old"
    before = {p.name: p.read_bytes() for p in mine.glob("*.ckpt")}
    other = ["--ckpt_path", str(chain / "digits" / "old" / "last.ckpt"), "--trainer.max_epochs", "2", *SMALL_NET]
    with pytest.raises(ValueError, match="a run started from .* would replace them"):
        run("old", art, *other)
    assert {p.name: p.read_bytes() for p in mine.glob("*.ckpt")} == before
    run("old", art, *other, "--overwrite")
    assert (mine / "last.replaced.ckpt").read_bytes() == before["last.ckpt"]


def test_resume_checkpoint_is_checked_before_training(chain, tmp_path):
    old_last = chain / "digits" / "old" / "last.ckpt"
    with pytest.raises(CheckpointError, match="is a checkpoint of the 'old' stage, not of 'new'"):
        run("new", tmp_path / "a", *SMALL_NET, "--ckpt_path", str(old_last))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(old_last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        run("old", tmp_path / "b", *SMALL_NET, "--ckpt_path", str(truncated))
    with pytest.raises(CheckpointError, match=r"built with other options \(net\..*\(8, .* in the checkpoint, \(16, "
                                              r".*Resume with the options that run used"):
        run("old", tmp_path / "c", "--model.width", "16", "--ckpt_path", str(old_last))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_fct_fit_prints_user_errors_without_a_traceback(tmp_path, monkeypatch):
    from tests.commands import fit_main

    monkeypatch.delenv("FCT_DEBUG", raising=False)
    base = ["--stage", "old", "--artifacts", str(tmp_path / "art"), *TINY, *SMALL_NET]
    for extra, message in [(["--model.lr", "-1"], "fct-fit: lr=-1.0 must be positive"),
                           (["--seed", "-1"], "--seed -1 is negative"),
                           (["--model.lr", "1e30", "--model.warmup_epochs", "0"], "is NaN at step")]:
        with pytest.raises(SystemExit, match=message):
            fit_main([*base, *extra])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--artifacts .*afile is a file, not a folder"):
        fit_main([*base, "--artifacts", str(tmp_path / "afile")])
    monkeypatch.setenv("FCT_DEBUG", "1")
    with pytest.raises(ValueError, match="lr=-1.0"):
        fit_main([*base, "--model.lr", "-1"])


def test_missing_upstream_message_trains_the_right_dataset_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"fct-fit --stage old --dataset digits --artifacts \S*empty\)"):
        run("transformation", tmp_path / "empty", *SMALL_H)


def test_unknown_option_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        fit(["--stage", "old", "--artifacts", str(tmp_path), *TINY, "--model.no_such_option", "1"])


def test_stored_features_transformed_by_fct_transform_match_images(full_chain, tmp_path):
    """h loaded alone (fct-transform's load_h) maps stored features to what the stage computes from images."""
    import numpy as np

    from fct_lightning.data import DATAMODULES
    from fct_lightning.gallery import transform

    ckpt = full_chain / "digits" / "transformation" / "best.ckpt"
    module, _ = load_stage(ckpt, "transformation", ("transformation",))
    images, _, _ = next(iter(DATAMODULES["digits"]().eval_dataloader("test")))
    with torch.no_grad():
        f = module.frozen_embeddings(images)
        direct = module.gallery_embed(images)
    np_old, np_side = tmp_path / "old.npy", tmp_path / "side.npy"
    np.save(np_old, f["old"].numpy())
    np.save(np_side, f["side"].numpy())
    out = transform(ckpt, np_old, tmp_path / "gallery.npy", np_side, device="cpu")
    torch.testing.assert_close(torch.from_numpy(np.load(out)), direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="side-info"):
        transform(ckpt, np_old, tmp_path / "g2.npy", device="cpu")


@pytest.mark.slow
def test_new_model_knn_top1_on_digits(tmp_path):
    """The shipped digits recipe: the new model's leave-one-out kNN top-1 is at least 0.9."""
    cli = fit(["--stage", "new", "--artifacts", str(tmp_path), "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.callback_metrics["val/new/new/top1"] >= 0.9


def test_fastfill_stage_and_backfill_curves(full_chain, capsys):
    chain = full_chain
    run("transformation", chain, *SMALL_H, "--model.uncertainty", "true")
    meta = read_checkpoint(chain / "digits" / "fastfill" / "best.ckpt", "transformation")["fct"]
    assert meta["uncertainty"] is True and meta["use_side_info"] is True
    out = chain / "digits" / "results" / "backfill.json"
    results = eval_main(["--artifacts", str(chain), "--no_wandb", "--cases", "new/new,fct+side/old,fct/old",
                         "--backfill", "random,uncertainty,distance", "--points", "5", "--backfill_seeds", "2",
                         "--out", str(out)])
    curves = results["backfill"]
    assert {"fct+side random", "fct+side uncertainty", "fct+side distance", "fct random", "fct distance"} <= set(curves)
    assert "fct uncertainty" not in curves  # the no-side-info h here has no uncertainty head
    for curve in curves.values():
        assert curve["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        # 100% backfilled is the new model on both sides
        assert abs(curve["curves"]["top1"][-1] - results["cases"]["new/new"]["top1"]) < 1e-9
    assert abs(curves["fct random"]["curves"]["map"][0] - results["cases"]["fct/old"]["map"]) < 1e-9
    printed = capsys.readouterr().out
    first = curves["fct+side distance"]["first"]
    assert (f"| fct+side distance | {first['error_ratio']:.2f} | {100 * first['misplaced']:.1f} | "
            f"{100 * first['misplaced_all']:.1f} |") in printed and "What each order backfills first" in printed
    assert first["error_ratio"] > 1  # the oracle takes the items h maps worst first
    report_main([str(out), "--out_dir", str(chain / "report_bf"), "--no_wandb"])
    assert (chain / "report_bf" / "backfill.png").is_file()
    assert "backfill fct+side uncertainty (mean AUC)" in capsys.readouterr().out
    # the uncertainty policy alone: the variant without a head is skipped, the cases and the other curve written
    only = chain / "digits" / "results" / "uncertainty.json"
    results = eval_main(["--artifacts", str(chain), "--no_wandb", "--cases", "new/new", "--backfill", "uncertainty",
                         "--points", "3", "--backfill_seeds", "1", "--out", str(only)])
    assert set(results["backfill"]) == {"fct+side uncertainty"} and only.is_file()
    only.unlink()


@pytest.mark.parametrize("cached", [True, False])
def test_cached_mode_trains_on_cached_features_only(chain, tmp_path, monkeypatch, cached):
    """Cached h training must see feature batches, never images (Lightning asks for the training loader early)."""
    from fct_lightning.stages import TransformationModel

    kinds: list[str] = []
    original = TransformationModel.training_step

    def spy(self, batch, batch_idx):
        kinds.append("features" if isinstance(batch, dict) else "images")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TransformationModel, "training_step", spy)
    run("transformation", chain, *SMALL_H, "--model.cached", str(cached).lower(),
        "--model.cache_dir", str(tmp_path / "cache"), "--artifacts", str(tmp_path / "out"),
        "--model.old_checkpoint", str(chain / "digits" / "old" / "best.ckpt"),
        "--model.new_checkpoint", str(chain / "digits" / "new" / "best.ckpt"),
        "--model.side_info_checkpoint", str(chain / "digits" / "side_info" / "best.ckpt"))
    assert kinds == ["features" if cached else "images"] * 2


def h_into(cache: Path, out: Path, chain: Path) -> tuple[str, ...]:
    """Options of a transformation run that writes into ``out`` and ``cache`` from the chain's frozen models."""
    return (*SMALL_H, "--model.cache_dir", str(cache), "--artifacts", str(out),
            *(arg for role in ("old", "new", "side_info")
              for arg in (f"--model.{role}_checkpoint", str(chain / "digits" / role / "best.ckpt"))))


def test_feature_cache_is_keyed_by_the_data_path(chain, tmp_path):
    """Views drawn per item and views drawn in memory are different caches; the same settings reuse one."""
    cache = tmp_path / "cache"
    common = h_into(cache, tmp_path / "out", chain)
    for in_memory in ("true", "false", "true"):
        run("transformation", chain, *common, "--data.in_memory_gpu", in_memory, "--overwrite")
    assert len(list(cache.glob("*/features.pt"))) == 2


def test_in_memory_feature_cache_is_keyed_by_the_batching(chain, tmp_path):
    """In memory, cached views are drawn per rank and batch: another evaluation batch size is another cache."""
    cache = tmp_path / "cache"
    common = h_into(cache, tmp_path / "out", chain)
    for batch in ("100", "64", "100"):
        run("transformation", chain, *common, "--data.in_memory_gpu", "true", "--data.eval_batch_size", batch,
            "--overwrite")
    assert len(list(cache.glob("*/features.pt"))) == 2


def test_feature_cache_is_keyed_by_the_split_content(chain, tmp_path, monkeypatch):
    """Files added to, removed from or edited in a folder split change its content key, and so h's feature cache
    (digits' arrays never change: the key is stood in for here)."""
    from fct_lightning.data import DigitsDataModule

    cache = tmp_path / "cache"
    common = h_into(cache, tmp_path / "out", chain)
    for content in ("before", "after", "before"):
        monkeypatch.setattr(DigitsDataModule, "content_key", lambda self, split, c=content: f"{split}:{c}")
        run("transformation", chain, *common, "--overwrite")
    assert len(list(cache.glob("*/features.pt"))) == 2


def test_run_without_any_validation_is_refused(tmp_path):
    """best.ckpt is written at validation; a run that would never validate stops before training, saying why."""
    with pytest.raises(SystemExit, match="max_epochs 1 is less than --trainer.check_val_every_n_epoch 3"):
        run("old", tmp_path, *SMALL_NET, "--trainer.check_val_every_n_epoch", "3")
    assert not (tmp_path / "digits" / "old" / "last.ckpt").exists()


def test_endless_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="max_epochs -1 without --trainer.max_steps makes the run endless"):
        fit(["--stage", "old", "--artifacts", str(tmp_path), "--trainer.max_epochs", "-1", *SMALL_NET])
    assert not (tmp_path / "digits" / "old").exists()


@pytest.mark.parametrize("extra", [("--trainer.limit_val_batches", "0"), ("--trainer.max_epochs", "0")])
def test_run_that_cannot_write_best_ckpt_is_refused(tmp_path, extra):
    with pytest.raises(SystemExit, match="best.ckpt"):
        run("old", tmp_path, *SMALL_NET, *extra)
    assert not (tmp_path / "digits" / "old").exists()


def test_run_cut_by_max_steps_before_validation_names_max_steps(tmp_path):
    with pytest.raises(SystemExit, match=r"--trainer.max_steps 1 ended it before its first validation"):
        run("old", tmp_path, *SMALL_NET, "--trainer.max_steps", "1")


def test_run_that_ended_without_best_ckpt_fails(tmp_path, monkeypatch):
    """Whatever kept best.ckpt from being written, the run does not end as a success the next stage trips over."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "_save_topk_checkpoint", lambda self, trainer, monitor_candidates: None)
    with pytest.raises(SystemExit, match="ended without writing .*best.ckpt"):
        run("old", tmp_path, *SMALL_NET)
    assert not (tmp_path / "digits" / "old" / "done.json").exists()


def copy_with_retrained(full_chain: Path, tmp_path: Path, role: str) -> Path:
    """A copy of the chain whose ``role`` checkpoint is another file, as a second ``fct-fit --stage role`` writes."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(full_chain / "digits", art / "digits", ignore=shutil.ignore_patterns("cache", "results"))
    path = art / "digits" / role / "best.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["retrained"] = True
    torch.save(ckpt, path)
    return art


def test_eval_of_a_moved_chain_finds_the_frozen_models_next_to_h(full_chain, tmp_path):
    """h and BCT store their frozen inputs' paths as given (relative to where fct-fit ran); after the artifacts were
    moved, fct-eval loads the models of the chain the checkpoint now sits in (checked by content digest)."""
    import shutil

    art = tmp_path / "moved"
    shutil.copytree(full_chain / "digits", art / "digits", ignore=shutil.ignore_patterns("cache", "results"))
    for folder in ("transformation", "transformation_noside", "bct"):
        path = art / "digits" / folder / "best.ckpt"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for key in [k for k in ckpt["hyper_parameters"] if k.endswith("_checkpoint") and ckpt["hyper_parameters"][k]]:
            ckpt["hyper_parameters"][key] = f"gone/digits/{key[:-len('_checkpoint')]}/best.ckpt"
        torch.save(ckpt, path)
    eval_main(["--artifacts", str(art), "--no_wandb", "--cases", "fct+side/old,fct/old,bct/old"])
    results = json.loads((art / "digits" / "results" / "eval.json").read_text())
    assert set(results["cases"]) == {"fct+side/old", "fct/old", "bct/old"} and results["missing"] == {}


def test_eval_refuses_a_chain_whose_upstream_was_retrained(full_chain, tmp_path):
    """old re-trained after h and BCT were built on it: fct-eval names the stale stages instead of mixing models."""
    art = copy_with_retrained(full_chain, tmp_path, "old")
    with pytest.raises(SystemExit, match="do not belong together") as err:
        eval_main(["--artifacts", str(art), "--no_wandb"])
    msg = str(err.value)
    for stage in ("transformation", "transformation_noside", "bct"):
        assert f"digits/{stage}/best.ckpt was trained with the old checkpoint" in msg
    assert "new checkpoint" not in msg and not (art / "digits" / "results").exists()
    # the cases that do not mix models still run
    results = eval_main(["--artifacts", str(art), "--no_wandb", "--cases", "old/old,new/new,new/old"])
    assert set(results["cases"]) == {"old/old", "new/new", "new/old"}


class FailInSecondEpoch(pl.Callback):
    """Stops a run with an error after its first validation wrote best.ckpt (a crash, an OOM kill)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_done_marker_and_no_silent_overwrite(tmp_path):
    out = tmp_path / "digits" / "old"
    run("old", tmp_path, *SMALL_NET)
    done = json.loads((out / "done.json").read_text())
    assert done["stage"] == "old" and done["epochs"] == 1 and 0 <= done["best"] <= 1
    first = (out / "best.ckpt").read_bytes()
    # a second fresh run would replace the checkpoints the later stages were trained from: refused, nothing touched
    with pytest.raises(ValueError, match="already holds checkpoints of the old stage.*--ckpt_path last.*--overwrite"):
        run("old", tmp_path, *SMALL_NET)
    assert (out / "best.ckpt").read_bytes() == first and (out / "done.json").is_file()
    # --overwrite: the previous files are kept aside; a crash after the first validation leaves no done.json
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("old", tmp_path, *SMALL_NET, "--overwrite", "--trainer.max_epochs", "2",
            "--trainer.callbacks+=tests.stages.test_chain.FailInSecondEpoch")
    assert (out / "best.replaced.ckpt").read_bytes() == first and (out / "last.replaced.ckpt").is_file()
    assert (out / "best.ckpt").is_file() and not (out / "done.json").exists()
    # a second --overwrite keeps the first one's files too: nothing written by a run is ever deleted
    crashed = (out / "best.ckpt").read_bytes()
    run("old", tmp_path, *SMALL_NET, "--overwrite")
    assert (out / "best.replaced.ckpt").read_bytes() == first
    assert (out / "best.replaced-2.ckpt").read_bytes() == crashed and (out / "last.replaced-2.ckpt").is_file()


def test_backfill_refuses_a_transformation_whose_upstream_was_retrained(full_chain, tmp_path):
    """The backfilling curves load h and its frozen models from their files: a stale h is refused there too, also
    when no cross-model case is asked for (those are what check the chain otherwise)."""
    art = copy_with_retrained(full_chain, tmp_path, "new")
    with pytest.raises(SystemExit, match="do not belong together") as err:
        eval_main(["--artifacts", str(art), "--no_wandb", "--cases", "old/old,new/new", "--backfill", "random",
                   "--points", "3", "--backfill_seeds", "1"])
    # the FastFill h when an earlier test of this module trained one into the chain, else the plain one
    assert re.search(r"digits/(fastfill|transformation)/best\.ckpt was trained with the new checkpoint", str(err.value))
    assert not (art / "digits" / "results").exists()


def test_backfill_judges_a_legacy_transformation_by_the_models_it_loads(full_chain, tmp_path):
    """A transformation written before the training digests were recorded cannot say what it was trained with; its
    curves are still refused when the frozen models it loads are not the chain's (here: h points at the original
    chain's new model, while the cases use a copy whose new model was re-trained)."""
    art = copy_with_retrained(full_chain, tmp_path, "new")
    for folder in ("fastfill", "fastfill_noside", "transformation", "transformation_noside"):
        path = art / "digits" / folder / "best.ckpt"
        if path.is_file():
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            for role in ("old", "new", "side_info"):
                ckpt["fct"].pop(f"{role}_digest", None)
            torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="do not belong together") as err:
        eval_main(["--artifacts", str(art), "--no_wandb", "--cases", "old/old,new/new", "--backfill", "random",
                   "--points", "3", "--backfill_seeds", "1"])
    assert re.search(r"digits/(fastfill|transformation)/best\.ckpt loads the new checkpoint", str(err.value))
    assert not (art / "digits" / "results").exists()


@pytest.mark.parametrize(("stage", "upstream"), [("bct", "old"), ("transformation", "new")])
def test_resume_refuses_an_upstream_changed_since_the_start(chain, tmp_path, stage, upstream):
    """BCT's synthesised old-classifier rows and h come back from last.ckpt: resuming them with another upstream model
    would mix two models, so it is refused and the checkpoint is left as it was."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(chain / "digits", art / "digits", ignore=shutil.ignore_patterns(
        "cache", "results", "bct", "transformation*", "fastfill*"))
    extra = SMALL_NET if stage == "bct" else SMALL_H
    run(stage, art, *extra)
    path = art / "digits" / upstream / "best.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["retrained"] = True
    torch.save(ckpt, path)
    last = art / "digits" / stage / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=f"the {upstream} checkpoint .* changed since this {stage} run"):
        run(stage, art, *extra, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert last.read_bytes() == before


def test_fastfill_refuses_classes_the_new_classifier_does_not_know(chain, tmp_path):
    """FastFill's discriminative term looks labels up in the new model's classifier: a new model trained on fewer
    classes than h's split is refused before any feature is cached, with the options that fix it."""
    art = tmp_path / "art"
    run("new", art, *SMALL_NET, "--data.train_classes", "5")
    with pytest.raises(ValueError, match=r"also has the classes \[5, 6, 7, 8, 9\].*fastfill_discriminative false"):
        run("transformation", art, *SMALL_H, "--model.uncertainty", "true",
            "--model.old_checkpoint", str(chain / "digits" / "old" / "best.ckpt"),
            "--model.side_info_checkpoint", str(chain / "digits" / "side_info" / "best.ckpt"))
    assert not (art / "digits" / "cache").exists()


@pytest.mark.parametrize("cached", [True, False])
def test_h_trains_when_the_last_batch_would_hold_one_item(chain, tmp_path, cached):
    """With a batch of n - 1 items, digits' n training items (1130 after the held-out tenth) leave a one-item last
    batch, which would stop h's BatchNorm1d ("Expected more than 1 value per channel"); the training loaders leave
    it out."""
    from fct_lightning.data import DigitsDataModule
    from fct_lightning.stages import TransformationModel

    n = len(DigitsDataModule(val_fraction=0.1).source("train"))  # configs/digits/data.yaml's division
    assert n == 1130

    steps: list[int] = []
    original = TransformationModel.training_step

    def spy(self, batch, batch_idx):
        steps.append(len(batch["labels"] if isinstance(batch, dict) else batch[1]))
        return original(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TransformationModel, "training_step", spy)
        run("transformation", chain, *h_into(tmp_path / "cache", tmp_path / "out", chain),
            "--data.batch_size", str(n - 1), "--trainer.limit_train_batches", "1.0",
            "--model.cached", str(cached).lower())
    assert steps == [n - 1]


@pytest.mark.parametrize(("max_epochs", "max_steps"), [(-1, 12), (50, 12), (3, -1)])
def test_warmup_and_bn_switch_follow_the_runs_length(chain, tmp_path, max_epochs, max_steps):
    """Warm-up is warmup_epochs epochs of the training loader, and h's BatchNorm freezes after bn_eval_after of
    the run, also when max_steps ends the run (or max_epochs is -1); before, -1 froze it from step 0 and
    warm-up took total / max_epochs steps."""
    import pytorch_lightning as pl

    class Probe(pl.Callback):
        def __init__(self):
            self.lrs, self.bn = [], {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            bn = [m.training for m in module.h.modules() if isinstance(m, torch.nn.BatchNorm1d)]
            self.bn.setdefault(trainer.current_epoch, all(bn))

    probe = Probe()
    from fct_lightning.stages import TransformationModel

    with pytest.MonkeyPatch.context() as mp:  # 1257 items at batch 316: 4 steps per epoch (the last has 309)
        original = TransformationModel.configure_optimizers
        mp.setattr(TransformationModel, "configure_optimizers",
                   lambda self: (self.trainer.callbacks.append(probe) if probe not in self.trainer.callbacks else None)
                   or original(self))
        fit(["--stage", "transformation", "--artifacts", str(tmp_path / "out"),
             *h_into(tmp_path / "cache", tmp_path / "out", chain)[len(SMALL_H):], *SMALL_H,
             "--data.batch_size", "316", "--model.warmup_epochs", "1", "--model.bn_eval_after", "0.5",
             "--trainer.max_epochs", str(max_epochs), "--trainer.max_steps", str(max_steps),
             "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
             "--trainer.enable_model_summary", "false"])
    lrs = probe.lrs
    assert len(lrs) == 12  # 3 epochs of 4 steps in every case
    # linear warm-up over the 4 steps of one epoch to the peak, then the cosine decay
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == max(lrs) > lrs[5] > lrs[-1], lrs
    assert probe.bn == {0: True, 1: True, 2: False}  # frozen from epoch 1.5 of 3, i.e. from epoch 2


def test_help_without_a_stage_is_not_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        fit(["--help"])
    assert exit_.value.code == 0 and "usage: fct-fit --stage" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--stage is required"):
        fit([])


def test_eval_checks_its_options_before_evaluating_and_keeps_results(chain, tmp_path):
    """Every fct-eval mistake stops with a message before the evaluation, and never replaces a results file."""
    out = tmp_path / "seed1.json"
    out.write_text('{"kept": true}')
    base = ["--artifacts", str(chain), "--no_wandb", "--out", str(out)]
    for extra, message in [
        (["--cases", ","], "names no case"),
        (["--backfill", "random", "--points", "1"], "--points 1: a curve needs at least 2 points"),
        (["--backfill", "nope"], "policy 'nope' is not known"),
        (["--backfill", ","], "names no policy"),
        (["--backfill_seeds", "0", "--backfill", "random"], "--backfill_seeds 0 must be at least 1"),
        (["--grid_backfill", "0.2"], "--grid_backfill 0.2 draws a backfilled gallery of the curves: give --backfill"),
        (["--backfill", "random", "--grid_backfill", "1.5"], r"--grid_backfill 1.5 must be a share .* in \[0, 1\]"),
        (["--split", "train", "--query_split", "test", "--gallery_split", "test"], "--split is the leave-one-out"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--artifacts", str(tmp_path / "typo")], "no case could be evaluated under --artifacts .*typo"),
    ]:
        with pytest.raises(SystemExit, match=message):
            eval_main([*base, *extra])
        assert out.read_text() == '{"kept": true}'
    with pytest.raises(SystemExit, match="must be a .json file path .*a folder"):
        eval_main([*base, "--out", str(tmp_path)])


def test_a_second_run_into_a_locked_folder_is_refused_and_changes_nothing(tmp_path):
    """Two fct-fit runs into one folder (a command started twice, or again while a killed fct-versions' child still
    trained) both wrote best.ckpt and last.ckpt; the second now stops before it decides anything."""
    import fcntl

    from fct_lightning.runs import LOCK_FILE

    folder = tmp_path / "digits" / "old"
    folder.mkdir(parents=True)
    with open(folder / LOCK_FILE, "a+") as holder:  # another process's lock: flock is per open file, so it conflicts
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242")
        holder.flush()
        with pytest.raises(SystemExit, match=r"another process \(pid 4242\) is training the old stage into"):
            run("old", tmp_path, *SMALL_NET)
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    run("old", tmp_path, *SMALL_NET)  # released (as the OS does when its holder dies): the run trains
    assert (folder / "best.ckpt").is_file() and (folder / "done.json").is_file()
