"""Reading stage checkpoints with checks: right stage, same dataset, matching dimensions, intact file.

Every checkpoint written by a stage carries ``checkpoint["fct"] = {"stage", "dataset", ...}``. Later stages
load their frozen inputs through :func:`~fct_lightning.stages.loading.load_stage`, which uses these checks to turn
each possible mistake into one message that names the file, what was expected, what was found, and what to do.

Checkpoints are read weights-only (:func:`read_checkpoint`): a ``.ckpt`` is a pickle, and a crafted one would
otherwise run code on the machine that loads it. Only tensors, numbers, strings, containers and the few plain
types in :data:`SAFE_GLOBALS` are rebuilt; a file that asks for anything else is refused before it is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pathlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the role it was given."""


def file_digest(path: str | Path, length: int = 16) -> str:
    """Content hash (sha256 prefix) of a file; identifies a checkpoint independently of its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


SAFE_GLOBALS: tuple[type, ...] = (pathlib.PosixPath,)
"""What a checkpoint may ask for beyond ``torch.load(weights_only=True)``'s own allowlist (tensors and their
storages, ``collections.OrderedDict``, the builtin containers and scalars), which covers every checkpoint
``fct-fit`` writes. ``pathlib.PosixPath``: the hyperparameters a stage or datamodule built from Python were given
(``root=Path(...)``, ``old_checkpoint=Path(...)``) are saved as they are; rebuilding a path from its parts only
makes the object (no file access)."""


@contextlib.contextmanager
def checkpoint_globals() -> Iterator[None]:
    """Allow :data:`SAFE_GLOBALS` to ``torch.load(weights_only=True)`` inside this context only (torch < 2.5 has
    no such context: there, only torch's own allowlist applies)."""
    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals"):
        yield
        return
    extra = [g for g in SAFE_GLOBALS if g not in serialization.get_safe_globals()]  # leave a caller's own in place
    with serialization.safe_globals(extra):
        yield


_ASKED = (re.compile(r"GLOBAL (\S+) was not an allowed global"), re.compile(r"unsupported GLOBAL (\S+) whose module"))


def _refused_globals(path: Path, err: BaseException) -> list[str]:
    """The Python objects a weights-only load refused in ``path`` ([] if it failed for another reason)."""
    message = str(err)
    if not message.startswith("Weights only load failed"):
        return []
    with contextlib.suppress(Exception), checkpoint_globals():  # every refused one, read from the pickle opcodes
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        if found:
            return found
    return [m.group(1) for pattern in _ASKED if (m := pattern.search(message))][:1]


def _reason(err: BaseException) -> str:
    """``err`` in a few words; of a weights-only failure, torch's own line without its advice to load unsafely."""
    message = str(err)
    if message.startswith("Weights only load failed"):
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        message = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation",
                                                                            "(1)", "(2)"))), "unsupported content")
    return f"{type(err).__name__}: {message}"


def read_checkpoint(path: str | Path, role: str) -> dict[str, Any]:
    """Load a checkpoint file on CPU, weights-only, with clear errors for a missing, unreadable or unsafe file.

    Args:
        path: The ``.ckpt`` file.
        role: What it is for (``old``, ``side_info``, ...), used in messages.

    Raises:
        CheckpointError: If the file is missing, corrupt, not a Lightning checkpoint, or asks for a Python object
            outside torch's weights-only allowlist and :data:`SAFE_GLOBALS` (it is then not loaded).
    """
    path = Path(path)
    if not path.is_file():
        train = f"fct-fit --stage {role}"
        if path.parent.name == role and path.name == "best.ckpt":  # <artifacts>/<dataset>/<role>/best.ckpt
            train += f" --dataset {path.parent.parent.name} --artifacts {path.parent.parent.parent}"
        raise CheckpointError(
            f"the {role} checkpoint {path} does not exist. Train it first ({train}) or pass the "
            f"right file with --model.{role}_checkpoint PATH."
        )
    try:
        with checkpoint_globals():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling or zip failure means the same thing to the user
        asked = _refused_globals(path, err) if isinstance(err, pickle.UnpicklingError) else []
        if asked:
            raise CheckpointError(
                f"the {role} checkpoint {path} asks for a Python object that is not allowed in a checkpoint "
                f"({', '.join(asked)}): unpickling it could run code, so it was not loaded. Use a checkpoint "
                "written by fct-fit (it holds only tensors, numbers, strings and containers)."
            ) from err
        raise CheckpointError(
            f"the {role} checkpoint {path} cannot be read ({_reason(err)}); the file is corrupt or "
            f"not a PyTorch checkpoint. Re-train the stage or restore the file (last.ckpt sits next to best.ckpt)."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"the {role} checkpoint {path} has no state_dict; it is not a Lightning checkpoint.")
    return ckpt


def checkpoint_meta(ckpt: dict[str, Any], path: str | Path, role: str) -> dict[str, Any]:
    """The ``fct`` metadata of a checkpoint; an error if it was not written by an fct-lightning stage."""
    meta = ckpt.get("fct")
    if not isinstance(meta, dict) or "stage" not in meta:
        raise CheckpointError(
            f"the {role} checkpoint {path} carries no fct-lightning metadata (no 'fct' entry); it was not written "
            "by fct-fit. Use a checkpoint from fct-fit."
        )
    return meta


def check_meta(
    meta: dict[str, Any], path: str | Path, role: str, stages: tuple[str, ...], dataset: str | None = None
) -> None:
    """Check a checkpoint's stage and dataset against what the role needs."""
    if meta["stage"] not in stages:
        raise CheckpointError(
            f"{path} is a '{meta['stage']}' checkpoint but the {role} role needs a {' or '.join(stages)} checkpoint; "
            f"pass the {role} model's best.ckpt (artifacts/<dataset>/{stages[0]}/best.ckpt)."
        )
    if dataset and meta.get("dataset") and meta["dataset"] != dataset:
        raise CheckpointError(
            f"{path} was trained on dataset '{meta['dataset']}' but this run uses '{dataset}'; all stages of one "
            "chain must use the same dataset."
        )


def relocate_inputs(hparams: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """Point a stage's frozen-input paths (``old_checkpoint``, ...) at the chain ``path`` now sits in.

    A stage stores the paths it was given, relative to the working directory it ran in. After the artifacts folder
    was moved or copied, or from another working directory, they name nothing (or another chain's files). The
    sibling ``<path>/../../<role>/best.ckpt`` is used instead when the stored file is missing, or when the stored
    file's content is not the one recorded at training time (``<role>_digest``) and the sibling's is. Whatever is
    loaded is then checked against those digests (:meth:`RetrievalStage.on_load_checkpoint`).
    """
    for key, value in list(hparams.items()):
        if not key.endswith("_checkpoint") or not value:
            continue
        role = key[: -len("_checkpoint")]
        stored, sibling = Path(value), path.parent.parent / role / "best.ckpt"
        if not sibling.is_file() or sibling.resolve() == stored.resolve():
            continue
        want = meta.get(f"{role}_digest")
        if stored.is_file() and (not want or file_digest(stored) == want):
            continue
        if not stored.is_file() or file_digest(sibling) == want:
            log.info("%s: the %s checkpoint it was trained with is not at %s; using %s", path, role, stored, sibling)
            hparams[key] = str(sibling)


def check_class_names(meta: dict[str, Any], path: str | Path, role: str, current: Any) -> None:
    """Refuse a checkpoint trained when the dataset's class list was another one.

    Labels are class indices, so a checkpoint only means the same thing while every class it was trained with
    keeps its index: the saved list (``meta["class_names"]``, recorded since it was added) must be the start of
    ``current``. Classes added at the end are fine (a new model trained on a grown dataset); a class inserted,
    removed or renamed would silently re-label the classes after it.
    """
    saved = meta.get("class_names")
    if not saved or current is None:
        return
    current = [str(c) for c in current]
    if current[: len(saved)] == list(saved):
        return
    changed = [f"index {i}: {a!r} then, {b!r} now" for i, (a, b) in enumerate(zip(saved, current, strict=False))
               if a != b]
    if len(current) < len(saved):
        changed.append(f"{len(saved) - len(current)} class(es) gone, e.g. {list(saved[len(current):])[:3]}")
    raise CheckpointError(
        f"the {role} checkpoint {path} was trained when the dataset had another class list ({len(saved)} classes "
        f"then, {len(current)} now; {'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): its class "
        "indices would now stand for other classes. Restore the class folders it was trained with, pin the old "
        "order with a classes.txt listing its classes first (new ones after them), or re-train the stages from "
        f"{role} on."
    )


def check_holdout(meta: dict[str, Any], path: str | Path, role: str, current: float | None) -> None:
    """Refuse an upstream checkpoint of the same dataset trained with another held-out validation share.

    Every stage of a chain must hold out the same training images (``--data.val_fraction``, the same division
    for every seed): an upstream model trained on this run's validation items would make its selection look
    better than the test split will. Checkpoints from before the share was recorded are taken as they are.
    """
    saved = meta.get("val_fraction")
    if saved is None or current is None or float(saved) == float(current):
        return
    raise CheckpointError(
        f"the {role} checkpoint {path} was trained with val_fraction={float(saved):g} of the training images held "
        f"out for validation, this run with {float(current):g}: the items one model validates on would be training "
        f"items of the other. Give this run --data.val_fraction {float(saved):g} (or set it in the dataset's "
        f"data.yaml for every stage), or re-train the stages from {role} on with {float(current):g}."
    )


def check_dims(expected: int, got: int, what: str, path: str | Path, fix: str) -> None:
    """Raise a clear error when two embedding dimensions that must agree do not."""
    if expected != got:
        raise CheckpointError(f"dimension mismatch: {what} is {got}-d in {path} but {expected}-d is needed; {fix}")


def check_resume(path: Path, stage: str, dataset: str, model: Any,
                 class_names: list[str] | None) -> tuple[int, int, float | None]:
    """The checkpoint given to ``--ckpt_path`` must be readable, of this stage and dataset, and shaped like the model
    this run builds; otherwise Lightning fails deep inside loading with a size-mismatch traceback.

    Returns the epochs and optimiser steps the checkpoint has done, and the best monitored value it records.
    """
    ckpt = read_checkpoint(path, stage)
    meta = checkpoint_meta(ckpt, path, stage)
    if meta["stage"] != stage:
        raise CheckpointError(
            f"--ckpt_path {path} is a checkpoint of the '{meta['stage']}' stage, not of '{stage}'; resume a "
            f"{stage} run (its last.ckpt, e.g. --ckpt_path last) or run fct-fit --stage {meta['stage']}.")
    if meta.get("dataset") and meta["dataset"] != dataset:
        raise CheckpointError(
            f"--ckpt_path {path} was trained on '{meta['dataset']}' but this run uses --dataset {dataset}; "
            f"pass --dataset {meta['dataset']} or a checkpoint of {dataset}.")
    check_class_names(meta, path, stage, class_names)
    own = model.state_dict()
    frozen = getattr(model, "frozen_prefixes", ())
    saved = ckpt["state_dict"]
    problems = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in this run"
                for k, v in saved.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    problems += [f"{k} is in the checkpoint, not in this run's model" for k in saved if k not in own]
    problems += [f"{k} is in this run's model, not in the checkpoint" for k in own
                 if k not in saved and k.split(".")[0] not in frozen]
    if problems:
        config = path.parent / "config.yaml"
        raise CheckpointError(
            f"--ckpt_path {path} was written by a model of the {stage} stage built with other options ("
            + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "). Resume with the options that run used"
            + (f" (they are in {config})" if config.is_file() else "")
            + ", or start a new run (drop --ckpt_path; --overwrite to replace this folder's checkpoints).")
    progress = (ckpt.get("loops") or {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", ckpt.get("epoch", -1) + 1)), int(ckpt.get("global_step", 0)), best_score(ckpt)


def best_score(saved: dict[str, Any]) -> float | None:
    """The best monitored value recorded by the checkpoint callbacks' state in a saved checkpoint."""
    states = [v for k, v in saved.get("callbacks", {}).items() if str(k).startswith("ModelCheckpoint")]
    best = next((v["best_model_score"] for v in states if v.get("best_model_score") is not None), None)
    return None if best is None else float(best)
