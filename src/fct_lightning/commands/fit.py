"""``fct-fit``: train one variant of the chain.

``fct-fit --stage V [--dataset D] [--artifacts DIR] [--resume auto | --ckpt_path last|PATH | --overwrite]
[LightningCLI options]`` looks the variant ``V`` up in :mod:`fct_lightning.chain` (its stage's LightningModule and
the options that make the variant), takes the dataset's LightningDataModule, loads the packaged configs
``configs/<D>/data.yaml`` and ``configs/<D>/<stage>.yaml`` and hands everything else to LightningCLI
(``--trainer.devices 8``, ``--trainer.max_epochs 3``, ``--data.root ...``, ``--config my.yaml``; unknown keys are
errors). It writes ``<DIR>/<D>/<V>/best.ckpt``, ``last.ckpt``, the resolved ``config.yaml`` and, when the run
completes, ``done.json``.

``--data embeddings`` trains a transformation from stored embeddings instead of images
(:class:`~fct_lightning.data.embeddings.EmbeddingsDataModule`, configs ``configs/embeddings/``):
``fct-fit --stage transformation --data embeddings --data.train STORE --data.val STORE``. No frozen checkpoint is
needed; ``D`` is the dataset the stores record (or ``--dataset D``, or ``embeddings``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import (
    Callback,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
    WeightAveraging,
)
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fct_lightning import chain
from fct_lightning.callbacks import StageCheckpoint, StageEMA
from fct_lightning.commands import run_command
from fct_lightning.data import DATAMODULES
from fct_lightning.data.embeddings import EmbeddingsDataModule
from fct_lightning.loggers import default_logger, ensure_wandb_mode
from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.runs import (
    DONE_FILE,
    aside,
    replaced_by_fresh_run,
    run_lock,
    stage_dir,
    start_mode,
    write_done,
)
from fct_lightning.stages.checkpoints import best_score, check_resume, checkpoint_globals, read_checkpoint

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: fct-fit's progress bar redraws every this many training steps (and at the end of each epoch)
PROGRESS_REFRESH_STEPS = 10
#: ``--data embeddings``: the datamodule and packaged configs (``configs/embeddings/``) of h from stored embeddings
EMBEDDINGS = "embeddings"


def stage_configs(dataset: str, stage: str) -> list[Path]:
    """The packaged default configs of ``stage`` on ``dataset``: the dataset's shared ``data.yaml`` (when there is
    one), then the stage's own file, which wins where both set a value."""
    path = CONFIG_DIR / dataset / f"{stage}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (CONFIG_DIR / dataset).glob("*.yaml") if p.stem != "data")
        raise ValueError(f"no packaged config {path} for --dataset {dataset} --stage {stage} (it has: {have}).")
    base = CONFIG_DIR / dataset / "data.yaml"
    return [base, path] if base.is_file() else [path]


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
        links = (("name", "dataset"), ("train_class_ids", "classes"), ("in_channels", "in_channels"))
        if self.datamodule_class is EmbeddingsDataModule:
            links += (("stored", "stored"),)  # h's dimensions and input digests, from the stores' spaces
        for source, target in links:
            if target in params:
                parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.add_class_arguments(RetrievalEvaluation, "retrieval", fail_untyped=True)

    @property
    def variant(self) -> chain.Variant:
        """The registered variant the built model is (e.g. ``--stage transformation --model.use_side_info false``
        is ``transformation_noside``)."""
        return chain.variant_of(self.stage, self.model.hparams)

    @property
    def out_dir(self) -> Path:
        """``<artifacts>/<dataset>/<variant>``."""
        return stage_dir(self.artifacts, self.dataset, self.variant.name)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        if isinstance(self.datamodule, EmbeddingsDataModule):  # the stores' dataset names the artifacts folder
            self.dataset = self.datamodule.name
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
        if getattr(self.model, "ema_decay", 0.0) > 0 and not any(isinstance(c, WeightAveraging) for c in user):
            callbacks.append(StageEMA(decay=self.model.ema_decay))
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
    p.add_argument("--stage", choices=list(chain.VARIANTS), metavar="{" + ",".join(chain.VARIANTS) + "}")
    p.add_argument("--dataset", default=None, choices=sorted(DATAMODULES), help="default digits")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--seed", type=int, default=0, help="run seed; each stage derives its own from it")
    p.add_argument("--overwrite", action="store_true", help="replace a stage's existing checkpoints")
    p.add_argument("--resume", choices=("auto",), default=None,
                   help="auto: skip a finished run, resume an interrupted one, else train anew (old files kept aside)")
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


def _embeddings_args(argv: list[str]) -> tuple[bool, list[str]]:
    """``(whether argv asks for --data embeddings, argv without it)``. Any other ``--data`` value (a config file,
    LightningCLI's own) stays in argv."""
    out, found, i = [], False, 0
    while i < len(argv):
        if argv[i] == "--data" and i + 1 < len(argv) and argv[i + 1] == EMBEDDINGS:
            found, i = True, i + 2
            continue
        if argv[i] == f"--data={EMBEDDINGS}":
            found = True
        else:
            out.append(argv[i])
        i += 1
    return found, out


def _default_args(variant: chain.Variant, artifacts: Path, dataset: str) -> list[str]:
    """Point the variant's upstream-checkpoint arguments at ``<artifacts>/<dataset>/<role>/best.ckpt``."""
    args = []
    for name in sorted(_init_params(variant.stage_class)):
        role = name[: -len("_checkpoint")] if name.endswith("_checkpoint") else None
        if role in variant.upstream:
            args += [f"--model.{name}", str(stage_dir(artifacts, dataset, role) / "best.ckpt")]
        if name == "cache_dir":
            args += ["--model.cache_dir", str(Path(artifacts) / dataset / "cache")]
    return args


def _variant_args(variant: chain.Variant, rest: list[str]) -> list[str]:
    """The variant's own options, last (no config file or later option undoes them); an option that contradicts
    one is an error instead of losing silently. A stage's own name (``--stage transformation``) imposes nothing: its
    options, and those given, pick the variant (``--model.uncertainty true`` trains ``fastfill``)."""
    if variant.name == variant.stage:
        return []
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--model.")}
    clash = [f"--model.{k}" for k in variant.options if f"--model.{k}" in given]
    if clash:
        raise ValueError(f"--stage {variant.name} sets {', '.join(clash)} itself (options {dict(variant.options)}); "
                         f"drop {', '.join(clash)}, or choose the variant with the options you want (--stage "
                         f"{variant.stage} plus your options picks it: {[v for v in chain.VARIANTS]})")
    return variant.cli_options()


class _StartRun(Callback):
    """What rank 0 changes in the stage's folder, once set-up has succeeded (frozen models loaded, caches built):
    ``--overwrite`` moves the previous checkpoints to ``*.replaced.ckpt``, ``done.json`` is removed until this run
    completes, and the resolved config is written. A run that fails before training leaves the folder as it was."""

    def __init__(self, cli: FCTCLI, replaced: list[Path]) -> None:
        self.cli, self.replaced = cli, replaced

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        kept = [f.replace(aside(f)).name for f in self.replaced if f.is_file()]
        if kept:
            rank_zero_info(f"fct-fit: --overwrite: the previous {', '.join(f.name for f in self.replaced)} of "
                           f"{self.cli.out_dir} are kept as {', '.join(kept)}")
        (self.cli.out_dir / DONE_FILE).unlink(missing_ok=True)
        _save_config(self.cli)


def _resolve_ckpt(ckpt_path: str | None, out: Path) -> str | None:
    if ckpt_path is None:
        return None
    path = out / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: checkpoint {path} does not exist. Train the stage first, or pass "
            "--ckpt_path with an existing .ckpt file."
        )
    return str(path)


def build_cli(argv: list[str] | None = None, **cli_kwargs: Any) -> tuple[FCTCLI, str | None]:
    """Parse ``fct-fit`` arguments and instantiate data, model and trainer (without fitting)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    embeddings, argv = _embeddings_args(argv)
    pre, rest = _pre_parser("fct-fit").parse_known_args(argv)
    if pre.stage is None:
        stages, datasets = ",".join(chain.VARIANTS), ",".join(sorted(DATAMODULES))
        usage = (
            f"usage: fct-fit --stage {{{stages}}} [--dataset {{{datasets}}} | --data embeddings --data.train STORE "
            "--data.val STORE] [--artifacts DIR] [--seed N] "
            "[--resume auto | --ckpt_path last|PATH | --overwrite] [LightningCLI options, see fct-fit --stage S "
            "--help]"
        )
        if {"-h", "--help"} & set(rest):
            print(usage)
            raise SystemExit(0)
        raise SystemExit(f"fct-fit: --stage is required.\n{usage}")
    variant = chain.get(pre.stage)
    stage_cls = variant.stage_class
    if embeddings and "stored" not in _init_params(stage_cls):
        trains = [v for v in chain.VARIANTS if "stored" in _init_params(chain.get(v).stage_class)]
        raise ValueError(f"--data embeddings trains h from stored embeddings: --stage {pre.stage} trains an image "
                         f"model; choose one of {trains}")
    if pre.seed < 0:
        raise ValueError(f"--seed {pre.seed} is negative; use a seed of 0 or more.")
    if pre.resume and (pre.ckpt_path or pre.overwrite):
        raise ValueError("--resume auto decides by itself whether to resume or train anew; leave out --ckpt_path "
                         "and --overwrite with it")
    artifacts = Path(pre.artifacts)
    if artifacts.exists() and not artifacts.is_dir():
        raise ValueError(f"--artifacts {artifacts} is a file, not a folder; pass a folder (it is created if "
                         "missing) where the stages' checkpoints go.")
    if any(a == "--seed_everything" or a.startswith("--seed_everything=") for a in rest):
        log.warning("fct-fit: --seed_everything replaces the seed this stage derives from --seed; stages given the "
                    "same value start from the same initial weights (e.g. old and new). Prefer --seed N.")
    seed = ["--seed_everything", str(1000 * pre.seed + variant.seed_offset)]
    dataset = pre.dataset or "digits"
    if embeddings:  # no frozen checkpoints to point at: the stores hold their embeddings
        configs = [a for path in stage_configs(EMBEDDINGS, variant.stage) for a in ("--config", str(path))]
        defaults = ["--data.dataset", pre.dataset] if pre.dataset else []
        dataset, datamodule = pre.dataset or EMBEDDINGS, EmbeddingsDataModule
    else:
        configs = [a for path in stage_configs(dataset, variant.stage) for a in ("--config", str(path))]
        defaults, datamodule = _default_args(variant, artifacts, dataset), DATAMODULES[dataset]
    args = [*configs, *seed, *_run_seed_args(stage_cls, pre.seed), *defaults, *rest, *_variant_args(variant, rest)]
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # the arguments come from `args`; the DDP launcher later re-runs the real sys.argv
    try:
        cli = FCTCLI(
            stage_cls, datamodule, stage=variant.stage, dataset=dataset, artifacts=artifacts,
            run_seed=pre.seed, args=args, run=False, seed_everything_default=0, save_config_callback=None,
            parser_kwargs={"prog": f"fct-fit --stage {pre.stage}", "allow_abbrev": False}, **cli_kwargs,
        )
    finally:
        sys.argv = saved_argv
    cli.overwrite, cli.resume = pre.overwrite, pre.resume
    return cli, _resolve_ckpt(pre.ckpt_path, cli.out_dir)


def _auto_start(cli: FCTCLI) -> str | None:
    """``--resume auto``: ``"skip"``, or the checkpoint to resume from (None: train anew, old files kept aside)."""
    upstream = [Path(v) for k, v in cli.model.hparams.items() if k.endswith("_checkpoint") and v]
    mode, why = start_mode(cli.out_dir, upstream)
    rank_zero_info(f"fct-fit --resume auto: {mode} ({why})")
    if mode == "resume":
        return str(cli.out_dir / "last.ckpt")
    cli.overwrite = True
    return "skip" if mode == "skip" else None


def _save_config(cli: FCTCLI) -> None:
    out = cli.out_dir
    out.mkdir(parents=True, exist_ok=True)
    text = cli.parser.dump(cli.config, skip_none=False)
    (out / "config.yaml").write_text(
        f"# resolved config of fct-fit --stage {cli.stage} --dataset {cli.dataset}\n{text}")
    if cli.trainer.logger is not None:
        cli.trainer.logger.log_hyperparams({"config": cli.config.as_dict(), "stage": cli.stage, "dataset": cli.dataset})


def fit(argv: list[str] | None = None) -> FCTCLI:
    """Run ``fct-fit`` with ``argv`` and return the CLI (model, datamodule, trainer) for inspection."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli, ckpt = build_cli(argv)
    if any(isinstance(lg, WandbLogger) for lg in cli.trainer.loggers):  # also one chosen with --trainer.logger
        ensure_wandb_mode()  # before the first wandb.init: offline without credentials, never a prompt or a failure
    _check_validation_runs(cli.trainer)
    with run_lock(cli.out_dir, cli.stage):  # how to start is decided, and the run trains, by one process at a time
        return _fit(cli, ckpt)


def _fit(cli: FCTCLI, ckpt: str | None) -> FCTCLI:
    """:func:`fit` once the CLI is built and the run folder locked."""
    if cli.resume == "auto":
        ckpt = _auto_start(cli)
        if ckpt == "skip":
            return cli
    # a checkpoint from another folder starts this folder's run from it (see replaced_by_fresh_run below)
    in_place = ckpt is not None and Path(ckpt).resolve().parent == cli.out_dir.resolve()
    if ckpt is not None:
        epochs_done, steps_done, best_done = check_resume(Path(ckpt), cli.stage, cli.dataset, cli.model,
                                                            getattr(cli.datamodule, "class_names", None))
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
    replaced = [] if in_place else replaced_by_fresh_run(cli.out_dir, cli.stage, cli.overwrite, ckpt)
    cli.trainer.callbacks.append(_StartRun(cli, replaced))
    start = time.perf_counter()
    try:
        with checkpoint_globals():  # Lightning's own load of --ckpt_path: weights-only too, whatever the environment
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
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
        saved = read_checkpoint(last, cli.stage)
        epochs = int(saved.get("epoch", -1)) + 1
        score = best_score(saved)
    return epochs, score


def _write_done(cli: FCTCLI, epochs: int, seconds: float, score: float | None) -> None:
    write_done(cli.out_dir, {"stage": cli.stage, "variant": cli.variant.name, "dataset": cli.dataset, "epochs": epochs,
                             "seconds": round(seconds, 1), "monitor": cli.model.monitor, "best": score})


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
    run_command("fct-fit", fit, argv)


if __name__ == "__main__":  # pragma: no cover
    fit_main()
