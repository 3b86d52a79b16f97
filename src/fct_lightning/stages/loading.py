"""Loading stage checkpoints: a whole stage (:func:`load_stage`) or a transformation's h alone (:func:`load_h`).

Both read the file through :func:`~fct_lightning.stages.checkpoints.read_checkpoint` and check its metadata first,
so a wrong, stale or damaged file ends in one message naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fct_lightning.models.adapters import ADAPTER_MAPS, Adapters
from fct_lightning.models.closed_form import CLOSED_FORM_MAPS, LinearMap
from fct_lightning.models.transformation import Transformation
from fct_lightning.stages.base import STAGE_CLASSES, RetrievalStage
from fct_lightning.stages.checkpoints import (
    CheckpointError,
    check_meta,
    checkpoint_meta,
    file_digest,
    read_checkpoint,
    relocate_inputs,
)


def load_stage(path: str | Path, role: str, stages: tuple[str, ...],
               dataset: str | None = None) -> tuple[RetrievalStage, dict[str, Any]]:
    """Load a stage's LightningModule from ``path`` after checking its metadata; returns ``(module, meta)``.

    ``meta`` is the checkpoint's ``fct`` metadata plus its ``path`` and content ``digest``.
    """
    ckpt = read_checkpoint(path, role)
    meta = checkpoint_meta(ckpt, path, role)
    check_meta(meta, path, role, stages, dataset)
    cls = STAGE_CLASSES[meta["stage"]]
    try:
        hparams = {cls.renamed_hparams.get(k, k): v for k, v in ckpt.get("hyper_parameters", {}).items()
                   if not k.startswith("_")}
        relocate_inputs(hparams, meta, Path(path))
        module = cls(**hparams)
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"the {role} checkpoint {path} does not fit the current {cls.__name__} ({err}); it was written by an "
            "incompatible version. Re-train the stage."
        ) from err
    module.eval()
    return module, dict(meta, path=str(path), digest=file_digest(path))


#: The stages whose checkpoints hold an h (the MLP, or a closed-form map or the orthogonal adapters, whose
#: ``fct["h"]`` names its ``kind``).
H_STAGES = ("transformation", "closed_form", "orthogonal")
#: The classes of h by ``fct["h"]["kind"]`` (the MLP h records none).
H_KINDS = {**CLOSED_FORM_MAPS, **ADAPTER_MAPS}


def load_h(path: str | Path) -> tuple[Transformation | LinearMap | Adapters, dict[str, Any]]:
    """h from a transformation checkpoint, without the frozen image models it was trained with.

    The checkpoint holds h's weights (the frozen models are not saved with it) and the arguments h was built
    with (``fct["h"]``), so a serving machine needs nothing else. A closed-form stage's h (``fct["h"]["kind"]``:
    ``linear``, ``procrustes``) is rebuilt by its class in :data:`~fct_lightning.models.closed_form.CLOSED_FORM_MAPS`,
    the orthogonal stage's adapters (``orthogonal``: F is the gallery transform, B is applied to queries with
    :func:`fct_lightning.models.adapters.backward`) by :data:`~fct_lightning.models.adapters.ADAPTER_MAPS`.
    Returns ``(h in eval mode, the checkpoint's fct metadata + path and digest)``.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, "transformation")
    meta = checkpoint_meta(ckpt, path, "transformation")
    if meta["stage"] not in H_STAGES:
        raise CheckpointError(
            f"{path} is a '{meta['stage']}' checkpoint; h is read from a transformation checkpoint "
            "(artifacts/<dataset>/transformation/best.ckpt, or fastfill/ ... for the other variants).")
    if not isinstance(meta.get("h"), dict):
        raise CheckpointError(f"the transformation checkpoint {path} does not record the arguments h was built with "
                              "(written by an older version); re-train the transformation stage.")
    state = {k[2:]: v for k, v in ckpt["state_dict"].items() if k.startswith("h.")}
    try:
        config = dict(meta["h"])
        kind = config.pop("kind", None)
        h = Transformation(**config) if kind is None else H_KINDS[kind](**config)
        h.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"the transformation checkpoint {path} does not fit the current Transformation "
                              f"({type(err).__name__}: {err}); it was written by an incompatible version. "
                              "Re-train the transformation stage.") from err
    return h.eval(), dict(meta, path=str(path.resolve()), digest=file_digest(path))
