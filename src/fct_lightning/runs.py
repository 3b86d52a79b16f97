"""A stage's run folder: where it lives, when it is finished, and how a new run into it starts.

``<artifacts>/<dataset>/<variant>/`` holds ``best.ckpt`` (written at validation), ``last.ckpt`` (the end of every
training epoch), the resolved ``config.yaml`` and, once the run has completed, ``done.json``. The start policy
(:func:`start_mode`) is the one ``fct-fit --resume auto`` and the Makefile use: skip a finished run that is newer
than its upstream runs, resume an interrupted one from ``last.ckpt``, and otherwise train anew, keeping the previous
checkpoints aside (:func:`aside`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs into one folder are not guarded
    fcntl = None

import yaml

DONE_FILE = "done.json"
"""Written into a stage's folder when its run has completed (``best.ckpt`` alone does not tell a finished stage from an
interrupted one); the Makefile's targets."""


LOCK_FILE = ".fct-fit.lock"
"""The lock a run holds on its folder while it decides how to start and trains (:func:`run_lock`)."""


def stage_dir(artifacts: str | Path, dataset: str, variant: str) -> Path:
    """Where a variant's checkpoints and resolved config live: ``<artifacts>/<dataset>/<variant>``."""
    return Path(artifacts) / dataset / variant


def upstream_marker(checkpoint: str | Path) -> Path:
    """What says when an upstream model was made: its run's ``done.json`` when there is one, else the file itself."""
    checkpoint = Path(checkpoint)
    done = checkpoint.parent / DONE_FILE
    return done if done.is_file() else checkpoint


def start_mode(out: Path, upstream: list[Path]) -> tuple[str, str]:
    """How a run into ``out`` starts under ``--resume auto``: ``("skip" | "resume" | "fresh", why)``.

    Args:
        out: The stage's folder.
        upstream: The checkpoints it is trained from (see :func:`upstream_marker`).

    ``skip``: ``done.json`` is there and no upstream model is newer. ``resume``: an interrupted run (``last.ckpt``,
    no ``done.json``) started after every upstream model was made. ``fresh``: anything else; an upstream stage
    re-trained since makes the old run belong to another model, which ``fct-fit`` would refuse to resume.
    """
    markers = [upstream_marker(u) for u in upstream]
    newest = max((m.stat().st_mtime for m in markers if m.exists()), default=float("-inf"))
    newer = [str(m) for m in markers if m.exists() and m.stat().st_mtime == newest]
    done, last = out / DONE_FILE, out / "last.ckpt"
    if done.is_file():
        if done.stat().st_mtime >= newest:
            return "skip", f"{done} is there and no upstream model is newer"
        return "fresh", f"{newer[0]} is newer than {done}: the stage is trained anew on it"
    if last.is_file():
        if last.stat().st_mtime > newest:
            return "resume", f"{last} holds an interrupted run"
        return "fresh", f"{newer[0]} is newer than the interrupted run's {last}: the stage is trained anew on it"
    return "fresh", f"no run in {out} yet"


def aside(f: Path) -> Path:
    """Where a replaced checkpoint is kept: ``best.replaced.ckpt``, then ``best.replaced-2.ckpt`` and so on, so that
    a second overwrite (e.g. after a failed run) does not destroy the first one's files."""
    n, path = 1, f.with_name(f"{f.stem}.replaced.ckpt")
    while path.exists():
        n += 1
        path = f.with_name(f"{f.stem}.replaced-{n}.ckpt")
    return path


def replaced_by_fresh_run(out: Path, stage: str, overwrite: bool, start: str | None = None) -> list[Path]:
    """The checkpoints a fresh run into ``out`` replaces; an error unless ``overwrite`` (later stages were trained
    from them). ``start``: the checkpoint of another folder such a run starts from."""
    found = [out / name for name in ("best.ckpt", "last.ckpt") if (out / name).is_file()]
    if found and not overwrite:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime for f in found)))
        run = f"a run started from {start}" if start else "a new run"
        raise ValueError(
            f"{out} already holds checkpoints of the {stage} stage ({', '.join(f.name for f in found)}, "
            f"written {when}); {run} would replace them. Continue that run with --ckpt_path last (or --resume "
            "auto), train into another folder with --artifacts DIR (one per seed, as `make SEED=N` does), or "
            "replace them with --overwrite (the old files are kept as *.replaced.ckpt; stages trained from them "
            "must then be re-trained, and fct-eval refuses them until they are).")
    return found


@contextlib.contextmanager
def run_lock(out: Path, stage: str) -> Iterator[None]:
    """Hold ``out``'s run lock for the ``with`` block: a second run into the same folder (a command started twice,
    or again while a killed parent's child still trains) is refused instead of writing the same checkpoints.

    The lock is an advisory ``flock`` on ``out/.fct-fit.lock``: the operating system drops it when its process
    ends, ``kill -9`` included, so a stopped run never leaves a stale lock. Only the first process of a distributed
    run takes it (its other ranks train into the same folder with it).

    Raises:
        SystemExit: When another process holds the lock, with its pid and what to do.
    """
    first = os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0"))) == "0" \
        and os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) == "0"
    if fcntl is None or not first:
        yield
        return
    made = [d for d in (out, *out.parents) if not d.exists()]  # removed again when the run writes nothing
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise SystemExit(
                f"fct-fit: another process (pid {holder}) is training the {stage} stage into {out}; two runs would "
                "write the same checkpoints. Wait for it to finish (the same command then skips or resumes the "
                f"run), or stop it (kill {holder}) and start again; to train both, give this one another "
                "--artifacts DIR.") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            if [p.name for p in out.iterdir()] == [LOCK_FILE]:  # refused before writing: leave no folder behind
                path.unlink()
                for d in made:
                    with contextlib.suppress(OSError):
                        d.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


def write_done(out: Path, record: dict[str, Any]) -> None:
    """``done.json``: the stage finished, with ``record`` (stage, epochs, best score ...) and the time."""
    (out / DONE_FILE).write_text(json.dumps({**record, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


# what evaluation and embedding take over from training's data settings: where the data is, which split and folders,
# the share of training images held out (so "train" and "holdout" are the run's), the image size, and how fast to
# load (not the training batch, classes, views or augmentation)
EVAL_DATA_KEYS = ("root", "image_size", "eval_split", "eval_batch_size", "train_dir", "eval_dir", "val_fraction",
                  "num_workers")


def eval_data_settings(data: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation-relevant entries (:data:`EVAL_DATA_KEYS`, those set) of a stage's datamodule arguments."""
    return {k: data[k] for k in EVAL_DATA_KEYS if (data or {}).get(k) is not None}


def config_data_settings(cfg: Path) -> dict[str, Any]:
    """:func:`eval_data_settings` of the ``data`` section of a run's ``config.yaml``."""
    return eval_data_settings((yaml.safe_load(cfg.read_text()) or {}).get("data"))


def chain_data_settings(artifacts: Path, dataset: str, variants: list[str]) -> dict[str, Any]:
    """The evaluation data settings of the first of ``variants`` whose run config exists, so evaluation reads the same
    folders at the same image size as training (e.g. ``make folder EXTRA="--data.eval_dir test"``)."""
    for variant in variants:
        cfg = stage_dir(artifacts, dataset, variant) / "config.yaml"
        if cfg.is_file():
            return config_data_settings(cfg)
    return {}
