"""Command-line entry points: ``fct-fit``, ``fct-eval`` and ``fct-report``.

``fct-fit --stage S [--dataset D] [--artifacts DIR] [--ckpt_path last|PATH] [LightningCLI options]``
picks the stage's LightningModule and the dataset's LightningDataModule, loads the packaged default config
``configs/<D>/<S>.yaml`` and hands everything else to LightningCLI (``--trainer.devices 8``,
``--trainer.max_epochs 3``, ``--data.root ...``, ``--config my.yaml``; unknown keys are errors). It writes
``<DIR>/<D>/<S>/best.ckpt``, ``last.ckpt`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import (
    Callback,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
)
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fct_lightning.callbacks import StageCheckpoint
from fct_lightning.data import DATAMODULES
from fct_lightning.loggers import default_logger, ensure_wandb_mode
from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages import STAGES

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: fct-fit's progress bar redraws every this many training steps (and at the end of each epoch)
PROGRESS_REFRESH_STEPS = 10


def stage_config(dataset: str, stage: str) -> Path:
    """The packaged default config of ``stage`` on ``dataset``."""
    path = CONFIG_DIR / dataset / f"{stage}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (CONFIG_DIR / dataset).glob("*.yaml"))
        raise SystemExit(f"fct-fit: no packaged config {path} for --dataset {dataset} --stage {stage} (it has: {have}).")
    return path


# Written into a stage's folder when its fct-fit run has completed (best.ckpt appears at the first validation,
# so it alone does not tell a finished stage from an interrupted one); the Makefile's targets.
DONE_FILE = "done.json"


def stage_dir(artifacts: str | Path, dataset: str, stage: str) -> Path:
    """Where a stage's checkpoints and resolved config live: ``<artifacts>/<dataset>/<stage>``."""
    return Path(artifacts) / dataset / stage


# Each stage gets its own seed (``1000 * --seed + offset``) so that, e.g., the old and new models do not
# start from the same initial weights: independently trained models must really be independent.
STAGE_SEED_OFFSETS = {"old": 0, "side_info": 1, "new": 2, "transformation": 3, "bct": 4}


def _init_params(cls: type) -> set[str]:
    """Constructor argument names of ``cls``, following ``**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


class FCTCLI(LightningCLI):
    """LightningCLI with the stage's links to its datamodule, checkpointing into the artifacts folder,
    retrieval evaluation and the default W&B logger."""

    def __init__(self, *args: Any, stage: str, dataset: str, artifacts: Path, run_seed: int = 0,
                 **kwargs: Any) -> None:
        self.stage, self.dataset, self.artifacts, self.run_seed = stage, dataset, Path(artifacts), run_seed
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        params = _init_params(self.model_class)
        for source, target in (("name", "dataset"), ("train_class_ids", "classes"), ("in_channels", "in_channels")):
            if target in params:
                parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.add_class_arguments(RetrievalEvaluation, "retrieval", fail_untyped=True)

    @property
    def out_dir(self) -> Path:
        """``<artifacts>/<dataset>/<name>``; the name is the stage's, or e.g. ``transformation_noside``."""
        return stage_dir(self.artifacts, self.dataset, getattr(self.model, "artifact_name", self.stage))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        out = self.out_dir
        user = config.get("callbacks") or []
        user = user if isinstance(user, list) else [user]
        if any(isinstance(c, ModelCheckpoint) for c in user):
            log.warning(
                "fct-fit: --trainer.callbacks has a ModelCheckpoint, so fct-fit adds none of its own: %s gets no "
                "best.ckpt, last.ckpt or done.json unless yours writes them there. Later stages, fct-eval and make "
                "read best.ckpt: give yours dirpath=%s, filename=best and monitor=%s, or leave it out.",
                out, out, self.model.monitor)
        else:
            # best.ckpt at validation; last.ckpt at the end of every training epoch, for resuming where the run
            # stopped (Lightning's save_last writes last.ckpt only when a best one is saved)
            callbacks += [
                StageCheckpoint(dirpath=out, filename="best", monitor=self.model.monitor, mode="max",
                                auto_insert_metric_name=False, enable_version_counter=False),
                StageCheckpoint(dirpath=out, filename="last", monitor=None, save_top_k=1, save_on_train_epoch_end=True,
                                auto_insert_metric_name=False, enable_version_counter=False),
            ]
        if not any(isinstance(c, RetrievalEvaluation) for c in user):
            callbacks.append(RetrievalEvaluation(**self._get(self.config, "retrieval")))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in user):
            # Lightning's default bar redraws after every step: about 0.3 ms of host time per step (measured on
            # a CPU), which a short GPU step cannot hide, and a log line per step when the output is a file
            callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS))
        if config.get("logger") is None or config.get("logger") is True:
            config["logger"] = default_logger(self.dataset, self.stage, self.artifacts, self.run_seed, out.name)
        return super()._instantiate_trainer(config, callbacks)


def _pre_parser(prog: str) -> argparse.ArgumentParser:
    # no abbreviations: LightningCLI's own `--data FILE` / `--data=...` must not be read as `--dataset`
    p = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("--stage", choices=sorted(STAGES))
    p.add_argument("--dataset", default="digits", choices=sorted(DATAMODULES))
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--seed", type=int, default=0, help="run seed; each stage derives its own from it")
    p.add_argument("--overwrite", action="store_true", help="replace a stage's existing checkpoints")
    return p


def _run_seed_args(stage_cls: type, seed: int) -> list[str]:
    """What else ``--seed N`` seeds: the data order and augmentation (``data.seed``) and the transformation's cached
    augmentations (``model.cache_seed``), so that seeds differ in everything random, not only in initial weights.
    Seed 0 leaves the configs' values; an explicit ``--data.seed`` / ``--model.cache_seed`` (later) wins."""
    if seed == 0:
        return []
    args = ["--data.seed", str(seed)]
    if "cache_seed" in _init_params(stage_cls):
        args += ["--model.cache_seed", str(seed)]
    return args


def _default_args(stage_cls: type, artifacts: Path, dataset: str) -> list[str]:
    """Point a stage's upstream-checkpoint arguments at ``<artifacts>/<dataset>/<role>/best.ckpt``."""
    args = []
    for name in _init_params(stage_cls):
        if name.endswith("_checkpoint"):
            role = name[: -len("_checkpoint")]
            args += [f"--model.{name}", str(stage_dir(artifacts, dataset, role) / "best.ckpt")]
        if name == "cache_dir":
            args += ["--model.cache_dir", str(Path(artifacts) / dataset / "cache")]
    return args


def _check_overwrite(out: Path, stage: str, resuming: bool, overwrite: bool, start: str | None = None) -> list[Path]:
    """A fresh run must not silently replace a stage's checkpoints (later stages were trained from them).

    ``resuming``: the run continues one of ``out``'s own checkpoints. ``start``: the checkpoint of another folder
    that a run into ``out`` starts from (as replacing as a fresh run). Returns the files that ``--overwrite`` will
    move aside (see :class:`_StartRun`).
    """
    found = [out / name for name in ("best.ckpt", "last.ckpt") if (out / name).is_file()]
    if resuming or not found:
        return []
    if not overwrite:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime for f in found)))
        run = f"a run started from {start}" if start else "a new run"
        raise SystemExit(
            f"fct-fit: {out} already holds checkpoints of the {stage} stage ({', '.join(f.name for f in found)}, "
            f"written {when}); {run} would replace them. Continue that run with --ckpt_path last, train into "
            "another folder with --artifacts DIR (one per seed, as `make SEED=N` does), or replace them with "
            "--overwrite (the old files are kept as *.replaced.ckpt; stages trained from them must then be "
            "re-trained, and fct-eval refuses them until they are)."
        )
    return found


class _StartRun(Callback):
    """What rank 0 changes in the stage's folder, once set-up has succeeded (frozen models loaded, caches built):
    ``--overwrite`` moves the previous checkpoints to ``*.replaced.ckpt``, ``done.json`` is removed until this run
    completes, and the resolved config is written. A run that fails before training leaves the folder as it was."""

    def __init__(self, cli: FCTCLI, replaced: list[Path]) -> None:
        self.cli, self.replaced = cli, replaced

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        kept = [f.replace(_aside(f)).name for f in self.replaced if f.is_file()]
        if kept:
            rank_zero_info(f"fct-fit: --overwrite: the previous {', '.join(f.name for f in self.replaced)} of "
                           f"{self.cli.out_dir} are kept as {', '.join(kept)}")
        (self.cli.out_dir / DONE_FILE).unlink(missing_ok=True)
        _save_config(self.cli)


def _aside(f: Path) -> Path:
    """Where ``--overwrite`` keeps a previous checkpoint: ``best.replaced.ckpt``, then ``best.replaced-2.ckpt`` and
    so on, so that a second overwrite (e.g. after a failed run) does not destroy the first one's files."""
    n, path = 1, f.with_name(f"{f.stem}.replaced.ckpt")
    while path.exists():
        n += 1
        path = f.with_name(f"{f.stem}.replaced-{n}.ckpt")
    return path


def _resolve_ckpt(ckpt_path: str | None, out: Path) -> str | None:
    if ckpt_path is None:
        return None
    path = out / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise SystemExit(
            f"fct-fit: cannot resume: checkpoint {path} does not exist. Train the stage first, or pass "
            "--ckpt_path with an existing .ckpt file."
        )
    return str(path)


def _check_resume_checkpoint(path: Path, cli: FCTCLI) -> tuple[int, int, float | None]:
    """The checkpoint given to ``--ckpt_path`` must be readable, of this stage and dataset, and shaped like the model
    this run builds; otherwise Lightning fails deep inside loading with a size-mismatch traceback.

    Returns the epochs and optimiser steps the checkpoint has done, and the best monitored value it records.
    """
    from fct_lightning.checkpoints import (
        CheckpointError,
        check_class_names,
        checkpoint_meta,
        read_checkpoint,
    )

    ckpt = read_checkpoint(path, cli.stage)
    meta = checkpoint_meta(ckpt, path, cli.stage)
    if meta["stage"] != cli.stage:
        raise CheckpointError(
            f"--ckpt_path {path} is a checkpoint of the '{meta['stage']}' stage, not of '{cli.stage}'; resume a "
            f"{cli.stage} run (its last.ckpt, e.g. --ckpt_path last) or run fct-fit --stage {meta['stage']}.")
    if meta.get("dataset") and meta["dataset"] != cli.dataset:
        raise CheckpointError(
            f"--ckpt_path {path} was trained on '{meta['dataset']}' but this run uses --dataset {cli.dataset}; "
            f"pass --dataset {meta['dataset']} or a checkpoint of {cli.dataset}.")
    check_class_names(meta, path, cli.stage, getattr(cli.datamodule, "class_names", None))
    own = cli.model.state_dict()
    frozen = getattr(cli.model, "frozen_prefixes", ())
    saved = ckpt["state_dict"]
    problems = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in this run"
                for k, v in saved.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    problems += [f"{k} is in the checkpoint, not in this run's model" for k in saved if k not in own]
    problems += [f"{k} is in this run's model, not in the checkpoint" for k in own
                 if k not in saved and k.split(".")[0] not in frozen]
    if problems:
        config = path.parent / "config.yaml"
        raise CheckpointError(
            f"--ckpt_path {path} was written by a model of the {cli.stage} stage built with other options ("
            + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "). Resume with the options that run used"
            + (f" (they are in {config})" if config.is_file() else "")
            + ", or start a new run (drop --ckpt_path; --overwrite to replace this folder's checkpoints).")
    progress = (ckpt.get("loops") or {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", ckpt.get("epoch", -1) + 1)), int(ckpt.get("global_step", 0)), _best_score(ckpt)


def build_cli(argv: list[str] | None = None, **cli_kwargs: Any) -> tuple[FCTCLI, str | None]:
    """Parse ``fct-fit`` arguments and instantiate data, model and trainer (without fitting)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, rest = _pre_parser("fct-fit").parse_known_args(argv)
    if pre.stage is None:
        stages, datasets = ",".join(sorted(STAGES)), ",".join(sorted(DATAMODULES))
        usage = (
            f"usage: fct-fit --stage {{{stages}}} [--dataset {{{datasets}}}] [--artifacts DIR] [--seed N] "
            "[--ckpt_path last|PATH] [--overwrite] [LightningCLI options, see fct-fit --stage S --help]"
        )
        if {"-h", "--help"} & set(rest):
            print(usage)
            raise SystemExit(0)
        raise SystemExit(f"fct-fit: --stage is required.\n{usage}")
    stage_cls = STAGES[pre.stage]
    if pre.seed < 0:
        raise SystemExit(f"fct-fit: --seed {pre.seed} is negative; use a seed of 0 or more.")
    artifacts = Path(pre.artifacts)
    if artifacts.exists() and not artifacts.is_dir():
        raise SystemExit(f"fct-fit: --artifacts {artifacts} is a file, not a folder; pass a folder (it is created if "
                         "missing) where the stages' checkpoints go.")
    if any(a == "--seed_everything" or a.startswith("--seed_everything=") for a in rest):
        log.warning("fct-fit: --seed_everything replaces the seed this stage derives from --seed; stages given the "
                    "same value start from the same initial weights (e.g. old and new). Prefer --seed N.")
    seed = ["--seed_everything", str(1000 * pre.seed + STAGE_SEED_OFFSETS.get(pre.stage, 0))]
    args = ["--config", str(stage_config(pre.dataset, pre.stage)), *seed, *_run_seed_args(stage_cls, pre.seed),
            *_default_args(stage_cls, artifacts, pre.dataset), *rest]
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # the arguments come from `args`; the DDP launcher later re-runs the real sys.argv
    try:
        cli = FCTCLI(
            stage_cls, DATAMODULES[pre.dataset], stage=pre.stage, dataset=pre.dataset, artifacts=artifacts,
            run_seed=pre.seed, args=args, run=False, seed_everything_default=0, save_config_callback=None,
            parser_kwargs={"prog": f"fct-fit --stage {pre.stage}", "allow_abbrev": False}, **cli_kwargs,
        )
    finally:
        sys.argv = saved_argv
    cli.overwrite = pre.overwrite
    return cli, _resolve_ckpt(pre.ckpt_path, cli.out_dir)


def _save_config(cli: FCTCLI) -> None:
    out = cli.out_dir
    out.mkdir(parents=True, exist_ok=True)
    text = cli.parser.dump(cli.config, skip_none=False)
    (out / "config.yaml").write_text(f"# resolved config of fct-fit --stage {cli.stage} --dataset {cli.dataset}\n{text}")
    if cli.trainer.logger is not None:
        cli.trainer.logger.log_hyperparams({"config": cli.config.as_dict(), "stage": cli.stage, "dataset": cli.dataset})


def fit(argv: list[str] | None = None) -> FCTCLI:
    """Run ``fct-fit`` with ``argv`` and return the CLI (model, datamodule, trainer) for inspection."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli, ckpt = build_cli(argv)
    if any(isinstance(lg, WandbLogger) for lg in cli.trainer.loggers):  # also one chosen with --trainer.logger
        ensure_wandb_mode()  # before the first wandb.init: offline without credentials, never a prompt or a failure
    _check_validation_runs(cli.trainer)
    # a checkpoint from another folder starts this folder's run from it (see _check_overwrite below)
    in_place = ckpt is not None and Path(ckpt).resolve().parent == cli.out_dir.resolve()
    if ckpt is not None:
        epochs_done, steps_done, best_done = _check_resume_checkpoint(Path(ckpt), cli)
        trainer = cli.trainer
        if (trainer.max_epochs or 0) > 0 and epochs_done >= trainer.max_epochs or 0 < trainer.max_steps <= steps_done:
            rank_zero_info(
                f"fct-fit: {ckpt} has finished its run ({epochs_done} epochs, {steps_done} steps; this run stops "
                f"at --trainer.max_epochs {trainer.max_epochs}, --trainer.max_steps {trainer.max_steps}): nothing "
                "to train, and no checkpoint was changed. To train longer, train anew with more epochs or steps "
                "(drop --ckpt_path, pass --overwrite): the learning-rate schedule is laid out for a run's length.")
            done = cli.out_dir / DONE_FILE
            if in_place and trainer.is_global_zero and (cli.out_dir / "best.ckpt").is_file() and not done.is_file():
                # stopped after its last checkpoint but before done.json (killed): the run is complete, say so
                _write_done(cli, epochs_done, 0.0, best_done)
            return cli
    # every rank refuses (under torchrun each rank runs this), before any work. A checkpoint from another folder
    # starts this folder's run from it: like a fresh run, it must not silently replace the checkpoints here
    replaced = _check_overwrite(cli.out_dir, cli.stage, in_place, cli.overwrite, ckpt)
    cli.trainer.callbacks.append(_StartRun(cli, replaced))
    start = time.perf_counter()
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    except SIGTERMException as err:  # a SystemExit with status 0: `make` would go on to the next stage
        raise SystemExit(
            f"fct-fit: the {cli.stage} run was stopped by SIGTERM in epoch {cli.trainer.current_epoch}; done.json "
            f"was not written. Resume it with the same command and --ckpt_path last ({cli.out_dir / 'last.ckpt'} "
            "holds its last finished epoch); make resumes it by itself.") from err
    seconds = time.perf_counter() - start
    epochs, score = _outcome(cli)
    rank_zero_info(_summary(cli, seconds, epochs, score))
    if cli.trainer.is_global_zero and (cli.out_dir / "best.ckpt").is_file():
        _write_done(cli, epochs, seconds, score)
    elif cli.trainer.is_global_zero and not (cli.trainer.interrupted or cli.trainer.fast_dev_run):
        ckpt_cb = cli.trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.filename == "best":  # fct-fit's own checkpointing, not a user's
            trainer = cli.trainer
            if 0 < trainer.max_steps <= trainer.global_step:
                why = (f"--trainer.max_steps {trainer.max_steps} ended it before its first validation (an epoch is "
                       f"{trainer.num_training_batches} batches, validated every "
                       f"{trainer.check_val_every_n_epoch} epoch(s)); train for more steps, or validate within "
                       "epochs with --trainer.val_check_interval N (batches)")
            else:
                why = (f"no validation logged {cli.model.monitor}; check --trainer.limit_val_batches, "
                       "--trainer.check_val_every_n_epoch and --trainer.val_check_interval")
            raise SystemExit(
                f"fct-fit: the {cli.stage} run ended without writing {cli.out_dir / 'best.ckpt'}, which the later "
                f"stages and fct-eval read: {why}.")
    return cli


def _check_validation_runs(trainer: Trainer) -> None:
    """best.ckpt, which later stages read, is written at validation: refuse a run in which none would happen."""
    every, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if epochs == 0 or trainer.max_steps == 0:
        raise SystemExit("fct-fit: --trainer.max_epochs 0 / --trainer.max_steps 0 trains nothing and writes no "
                         "best.ckpt for the later stages; train for at least one epoch.")
    if trainer.limit_val_batches == 0 and not trainer.fast_dev_run:
        raise SystemExit(
            "fct-fit: --trainer.limit_val_batches 0 turns validation off, but best.ckpt, which the later stages and "
            "fct-eval read, is chosen and written at validation; validate on part of the split instead "
            "(e.g. --trainer.limit_val_batches 0.25) or less often (--trainer.check_val_every_n_epoch N).")
    if epochs == -1 and trainer.max_steps == -1:
        raise SystemExit(
            "fct-fit: --trainer.max_epochs -1 without --trainer.max_steps makes the run endless, but every stage's "
            "warm-up + cosine learning-rate schedule needs its length; set --trainer.max_epochs N or "
            "--trainer.max_steps N.")
    if every and epochs is not None and 0 < epochs < every:
        raise SystemExit(
            f"fct-fit: --trainer.max_epochs {epochs} is less than --trainer.check_val_every_n_epoch {every}, so no "
            "validation would run and no best.ckpt would be written for the later stages; set "
            f"--trainer.check_val_every_n_epoch {epochs} (or fewer) or train for at least {every} epochs."
        )


def _outcome(cli: FCTCLI) -> tuple[int, float | None]:
    """Epochs trained and the best monitored value. Under ``ddp_spawn`` the training ran in other processes and
    this one's trainer and callbacks did not move: the values are then read back from ``last.ckpt``."""
    from pytorch_lightning.strategies.launchers.multiprocessing import (
        _MultiProcessingLauncher,
    )

    ckpt_cb = cli.trainer.checkpoint_callback
    epochs = cli.trainer.current_epoch
    score = None if ckpt_cb is None or ckpt_cb.best_model_score is None else float(ckpt_cb.best_model_score)
    last = cli.out_dir / "last.ckpt"
    if isinstance(cli.trainer.strategy.launcher, _MultiProcessingLauncher) and last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
        epochs = int(saved.get("epoch", -1)) + 1
        score = _best_score(saved)
    return epochs, score


def _best_score(saved: dict[str, Any]) -> float | None:
    """The best monitored value recorded by the checkpoint callbacks' state in a saved checkpoint."""
    states = [v for k, v in saved.get("callbacks", {}).items() if str(k).startswith("ModelCheckpoint")]
    best = next((v["best_model_score"] for v in states if v.get("best_model_score") is not None), None)
    return None if best is None else float(best)


def _write_done(cli: FCTCLI, epochs: int, seconds: float, score: float | None) -> None:
    """``done.json``: the stage finished (the Makefile's targets are these files)."""
    (cli.out_dir / DONE_FILE).write_text(json.dumps(
        {"stage": cli.stage, "dataset": cli.dataset, "epochs": epochs, "seconds": round(seconds, 1),
         "monitor": cli.model.monitor, "best": score, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def _summary(cli: FCTCLI, seconds: float, epochs: int, score: float | None) -> str:
    """One line per stage for logs: wall time, best monitored value and the last epoch's retrieval metrics."""
    variant = "" if cli.out_dir.name == cli.stage else f" ({cli.out_dir.name})"
    lines = [(f"fct-fit: stage {cli.stage}{variant} on {cli.dataset} done in {seconds:.1f} s "
              f"({epochs} epochs); checkpoints in {cli.out_dir}")]
    if score is not None:
        lines.append(f"  best {cli.model.monitor} = {score:.4f}")
    for cb in cli.trainer.callbacks:
        if isinstance(cb, RetrievalEvaluation):
            for case, m in cb.results.items():
                lines.append(f"  last epoch {case}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in m.items()))
    return "\n".join(lines)


def fit_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-fit`` (console scripts must return None)."""
    from fct_lightning.checkpoints import CheckpointError
    from fct_lightning.data.features import CacheError

    try:
        fit(argv)
    except (CheckpointError, CacheError, FileNotFoundError, ValueError, FloatingPointError) as err:
        # options out of range, NaN losses, unusable checkpoints or caches: the message names the problem and
        # the fix; a traceback would bury it (FCT_DEBUG=1 keeps it, for bug reports)
        if os.environ.get("FCT_DEBUG"):
            raise
        raise SystemExit(f"fct-fit: {err}\n(set FCT_DEBUG=1 to see the traceback)") from err


def eval_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-eval``."""
    from fct_lightning.evaluation import main

    main(argv)


def _user_errors(prog: str, main: Any, argv: list[str] | None) -> None:
    """Run ``main``; a user error (bad path, wrong checkpoint, mismatched dimensions, corrupt file) ends with its
    one-line message instead of a traceback (``FCT_DEBUG=1`` keeps the traceback)."""
    from fct_lightning.checkpoints import CheckpointError

    try:
        main(argv)
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as err:
        if os.environ.get("FCT_DEBUG"):
            raise
        raise SystemExit(f"{prog}: {err}\n(set FCT_DEBUG=1 to see the traceback)") from err


def embed_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-embed``."""
    from fct_lightning.gallery import embed_main as main

    _user_errors("fct-embed", main, argv)


def transform_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-transform``."""
    from fct_lightning.gallery import transform_main as main

    _user_errors("fct-transform", main, argv)


def report_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-report``."""
    from fct_lightning.report import main

    main(argv)


if __name__ == "__main__":  # pragma: no cover
    fit_main()
