"""Retrieval evaluation at the end of every validation epoch, exact under any number of DDP ranks."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from fct_lightning.retrieval.ann import evaluate_index
from fct_lightning.retrieval.evaluate import evaluate
from fct_lightning.retrieval.neighbors import faiss_module

log = logging.getLogger(__name__)


def deduplicate(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Sort gathered items by their index and drop repeats (the padding that DistributedSampler adds).

    Args:
        index: ``[N]`` item positions in the split, possibly with repeats.
        tensors: Tensors with ``N`` rows, reordered the same way.

    Returns:
        ``(unique_index, *tensors)`` with rows in increasing item index, each item once.
    """
    order = torch.argsort(index, stable=True)
    index = index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return (index[keep], *(t[order][keep] for t in tensors))


def flatten_gathered(t: Tensor, world_size: int) -> Tensor:
    """``[W, n, ...]`` from ``LightningModule.all_gather`` -> ``[W*n, ...]``; unchanged with one rank."""
    return t.reshape(-1, *t.shape[2:]) if world_size > 1 else t


class RetrievalEvaluation(pl.Callback):
    """Evaluates every case the stage declares (``pl_module.eval_cases``) on the validation split.

    Validation steps return ``{"embeddings": {space: [B, D]}, "labels": [B], "index": [B]}``. At the end of
    the epoch the callback gathers them from all ranks, removes DistributedSampler's padding duplicates by
    item index, computes the metrics once (on rank 0, on its device, i.e. the GPU when there is one: exact
    distances with the default backend, FAISS's with ``backend="faiss"``), broadcasts them (or rank 0's error,
    which every rank then raises) and logs ``val/<case>/<metric>`` on every rank so ModelCheckpoint and
    EarlyStopping can monitor them.
    With ``index`` set, rank 0 then also builds a FAISS index of each case's gallery, as a deployment would, and
    logs top-k and mAP@R through its top-k hits as ``val/<case>/index/<metric>`` (full-ranking mAP needs every
    rank and has no index counterpart), plus ``val/index_seconds``, the epoch's index build and search time.
    With ``"Flat"`` they equal the exact metrics bit for bit (:mod:`~fct_lightning.retrieval.ann`); with an
    approximate index they show what it costs. The exact metrics stay the ones checkpoints select on.
    The query set equals the gallery set (leave-one-out). The sanity check is skipped.

    Args:
        distance: ``l2`` or ``cosine``.
        ks: CMC cut-offs.
        backend: Search backend for :func:`~fct_lightning.retrieval.evaluate` (``auto``, ``torch``, ``faiss``).
        index: FAISS ``index_factory`` string for the index metrics (``"Flat"``, ``"IVF64,Flat"``, ``"HNSW32"``,
            ...; on the GPU when FAISS has one and the embeddings are on CUDA); None or ``"none"`` turns them off.
        index_nprobe: Inverted lists visited per query by an IVF index (None: FAISS's default, 1).
    """

    def __init__(self, distance: str = "l2", ks: tuple[int, ...] = (1, 5), backend: str = "auto",
                 index: str | None = "Flat", index_nprobe: int | None = None) -> None:
        super().__init__()
        self.distance = distance
        self.ks = tuple(ks)
        self.backend = backend
        self.index = None if index is None or index.strip().lower() in ("", "none") else index.strip()
        if self.index is not None:
            faiss_module()  # ImportError naming the package now, not after the first training epoch
        if index_nprobe is not None and (isinstance(index_nprobe, bool) or index_nprobe < 1):
            raise ValueError(f"index_nprobe={index_nprobe!r} must be a positive integer or None.")
        self.index_nprobe = index_nprobe
        self.results: dict[str, dict[str, float]] = {}
        self.index_results: dict[str, dict[str, float]] = {}
        self.index_seconds: float | None = None
        self._buffers: dict[str, list[Tensor]] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers = {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "embeddings" not in outputs:
            return
        items = {f"emb:{k}": v for k, v in outputs["embeddings"].items()}
        items.update(labels=outputs["labels"], index=outputs["index"])
        for key, value in items.items():
            self._buffers.setdefault(key, []).append(value.detach().float() if value.is_floating_point() else value)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._buffers:
            return
        gathered = {}
        for key in sorted(self._buffers):
            local = torch.cat(self._buffers[key])
            gathered[key] = flatten_gathered(pl_module.all_gather(local), trainer.world_size)
        self._buffers = {}
        outcome: tuple[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                outcome = ("ok", self.compute_all(gathered, pl_module.eval_cases))
            except Exception as err:  # noqa: BLE001 - every rank must leave the broadcast, then all raise it
                outcome = ("error", err)
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if outcome[0] == "error":  # raised on every rank: the others would otherwise wait in the next collective
            raise outcome[1]
        self.results, self.index_results, self.index_seconds = outcome[1]
        logged = {f"val/{case}/{name}": v for case, metrics in self.results.items() for name, v in metrics.items()}
        logged.update({f"val/{case}/index/{name}": v for case, metrics in self.index_results.items()
                       for name, v in metrics.items()})
        if self.index_seconds is not None:
            logged["val/index_seconds"] = self.index_seconds
        for key, value in logged.items():
            pl_module.log(key, value, sync_dist=False, rank_zero_only=False, batch_size=1)

    def compute_all(self, gathered: dict[str, Tensor], cases: dict[str, tuple[str, str]]
                    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], float | None]:
        """Exact metrics, index metrics (empty without ``index``) and the index's build and search seconds."""
        labels, spaces = self._spaces(gathered)
        start = time.perf_counter()
        exact = self._exact(labels, spaces, cases)
        if self.index is None:
            return exact, {}, None
        middle = time.perf_counter()
        through_index = {
            case: evaluate_index(spaces[q], labels, spaces[g], labels, factory=self.index, distance=self.distance,
                                 exclude_self=True, nprobe=self.index_nprobe, ks=self.ks)
            for case, (q, g) in cases.items()
        }
        seconds = time.perf_counter() - middle
        log.debug("retrieval through index %r on %d items: %.3f s (exact metrics: %.3f s): %s", self.index,
                  len(labels), seconds, middle - start, through_index)
        return exact, through_index, seconds

    def compute(self, gathered: dict[str, Tensor], cases: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
        """Deduplicate the gathered items and evaluate every case exactly."""
        return self._exact(*self._spaces(gathered), cases)

    @staticmethod
    def _spaces(gathered: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Labels and embeddings per space of the deduplicated items, checked to be finite."""
        keys = [k for k in gathered if k.startswith("emb:")]
        index, labels, *embs = deduplicate(gathered["index"], gathered["labels"], *(gathered[k] for k in keys))
        spaces = {k[4:]: e for k, e in zip(keys, embs, strict=True)}
        for space, emb in spaces.items():
            bad = int((~torch.isfinite(emb).all(dim=1)).sum())
            if bad:
                raise FloatingPointError(
                    f"{bad} of {len(emb)} validation embeddings of space '{space}' are NaN or inf: the model diverged "
                    "in this epoch (the checkpoints of earlier epochs are intact). Lower --model.lr, or clip gradients "
                    "with --trainer.gradient_clip_val 1.0."
                )
        return labels, spaces

    def _exact(self, labels: Tensor, spaces: dict[str, Tensor],
               cases: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
        results = {}
        for case, (q, g) in cases.items():
            missing = {q, g} - spaces.keys()
            if missing:
                raise KeyError(f"case {case!r} needs embedding spaces {sorted(missing)} "
                               "that eval_embeddings did not return")
            results[case] = evaluate(
                spaces[q], labels, spaces[g], labels,
                exclude_self=True, distance=self.distance, ks=self.ks, backend=self.backend,
            )
        log.debug("retrieval on %d items: %s", len(labels), results)
        return results
