"""The Python API: fit h on arrays of embeddings, transform a gallery, without the command line.

::

    h = fit_transformation(old, new, side=side, epochs=20)       # [N, d] arrays of the same N training items
    gallery_new = transform(h, gallery_old, gallery_side)          # [G, d_new] numpy array
    metrics = fct_lightning.retrieval.evaluate(queries_new, query_labels, gallery_new, gallery_labels,
                                               exclude_self=False)

The pieces are the command line's own: :func:`fit_transformation` trains the transformation stage
(:class:`~fct_lightning.stages.transformation.TransformationModel`) on an
:class:`~fct_lightning.data.embeddings.EmbeddingsDataModule` with a Lightning ``Trainer``, as ``fct-fit --stage
transformation --data embeddings`` does (validated by the same
:class:`~fct_lightning.retrieval.callback.RetrievalEvaluation`), and :func:`transform` runs h as fct-transform does
(:meth:`~fct_lightning.models.transformation.Transformation.transform_stored`). See ``docs/python_api.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from fct_lightning.data.embeddings import EmbeddingsDataModule
from fct_lightning.models.transformation import Transformation
from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages.loading import load_h
from fct_lightning.stages.transformation import TransformationModel


def fit_transformation(old: Any, new: Any, side: Any = None, labels: Any = None, *,
                       val: Mapping[str, Any] | None = None, epochs: int = 20, batch_size: int = 256, seed: int = 0,
                       checkpoint: str | Path | None = None, trainer: Mapping[str, Any] | None = None,
                       **options: Any) -> Transformation:
    """Train h: (old, side) -> new on the embeddings of the same training items, as ``fct-fit`` trains it.

    Args:
        old: ``[N, d_old]`` old-model embeddings (numpy or torch, float).
        new: ``[N, d_new]`` new-model embeddings of the same items, in the same order.
        side: ``[N, d_side]`` side-info features, or None for h(old) alone (the ``fct/old`` variant).
        labels: ``[N]`` integer labels (only FastFill's discriminative term uses them), or None.
        val: validation items, ``{"old", "new", "labels"}`` (and ``"side"`` with side-info): every epoch logs the
            cases ``fct+side/old`` (or ``fct/old``), ``old/old`` and ``new/new`` on them, as fct-fit does.
        epochs: training epochs (the learning-rate schedule is warm-up + cosine over them).
        batch_size: training rows per batch.
        seed: seeds h's initial weights and the order of the training rows.
        checkpoint: also write h's checkpoint there (what fct-transform, FastFill backfilling and
            :func:`~fct_lightning.stages.loading.load_h` read).
        trainer: more ``pytorch_lightning.Trainer`` arguments (``accelerator``, ``devices``, ``precision``, ...).
        **options: the transformation stage's options (:class:`~fct_lightning.stages.transformation.
            TransformationModel`): ``mixer_width``, ``mixer_depth``, ``loss``, ``lr``, ``weight_decay``,
            ``uncertainty`` (FastFill; with ``fastfill_discriminative=False``, as there is no new classifier), ...

    Returns:
        h (a :class:`~fct_lightning.models.transformation.Transformation`, in eval mode on the CPU) as trained
        in the last epoch.
    """
    if "use_side_info" in options or "stored" in options:
        raise ValueError("fit_transformation decides use_side_info by side= (None: h(old) alone) and stored by the "
                         f"arrays; leave out {sorted({'use_side_info', 'stored'} & set(options))}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} is invalid; allowed: an integer >= 1")
    train = {"old": old, "new": new, **({"side": side} if side is not None else {})}
    val_arrays = None if val is None else {k: v for k, v in val.items() if k != "labels"}
    if val_arrays is not None and side is None:
        val_arrays.pop("side", None)
    dm = EmbeddingsDataModule.from_arrays(train, val_arrays, labels, None if val is None else val.get("labels"),
                                          dataset=options.pop("dataset", None), batch_size=batch_size, seed=seed)
    with torch.random.fork_rng(devices=[]):  # h's initial weights from `seed`, the caller's generator untouched
        torch.manual_seed(seed)
        model = TransformationModel(use_side_info=side is not None, stored=dm.stored, dataset=dm.name, **options)
    settings = {"max_epochs": epochs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0, "accelerator": "auto", "devices": 1,
                "callbacks": [RetrievalEvaluation()], **({"limit_val_batches": 0} if val is None else {}),
                **(trainer or {})}
    fit = pl.Trainer(**settings)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader|LeafSpec).*")
        fit.fit(model, datamodule=dm)
    if checkpoint is not None:
        fit.save_checkpoint(checkpoint, weights_only=True)
    return model.h.cpu().eval()


def transform(h: Transformation | str | Path, old: Any, side: Any = None, *, batch_size: int = 65536,
              device: str | torch.device = "cpu", uncertainty: bool = False) -> np.ndarray | tuple[np.ndarray, ...]:
    """Map stored old embeddings (and side-info) into the new model's space with h, as fct-transform does.

    Args:
        h: h from :func:`fit_transformation`, or a transformation checkpoint (read with
            :func:`~fct_lightning.stages.loading.load_h`).
        old: ``[G, d_old]`` old-model embeddings of the gallery.
        side: ``[G, d_side]`` side-info features (exactly when h takes side-info).
        batch_size: rows per forward pass.
        device: where h runs (``cpu``, ``cuda``, ...); the arrays stay on the host.
        uncertainty: also return FastFill's per-item log-variance ``[G]`` (h with an uncertainty head).

    Returns:
        ``[G, d_new]`` float32 array (with ``uncertainty``: ``(that array, [G] log-variances)``).
    """
    if isinstance(h, str | Path):
        h = load_h(h)[0]
    if not isinstance(h, Transformation):
        raise TypeError(f"h must be a Transformation or a transformation checkpoint path, got {type(h).__name__}")
    h = h.to(device)
    pred, log_var = h.transform_stored(_float32(old), _float32(side), batch_size, uncertainty, out_device="cpu")
    return (pred.numpy(), log_var.numpy()) if uncertainty else pred.numpy()


def _float32(x: Any) -> torch.Tensor | None:
    """A float32 CPU tensor of the array ``x`` (numpy or torch), None for None."""
    if x is None:
        return None
    return x.detach().to("cpu", torch.float32) if isinstance(x, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(x, dtype=np.float32))


__all__ = ["fit_transformation", "transform"]
