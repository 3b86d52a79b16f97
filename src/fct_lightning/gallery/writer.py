"""Writing Lightning's predictions into a store: each rank its own shards, rank 0 publishes the spaces last.

:class:`StoreWriter` is a ``BasePredictionWriter`` (``write_interval="batch"``). A batch carries the store rows of
its items (``(images, rows)``), and a prediction is ``{space: [B, dim] embeddings}``; the writer hands them to one
:class:`~fct_lightning.store.SpaceWriter` per space, which writes a shard as soon as all its rows are in. Each rank
writes the shards ``store.shards_for(global_rank, world_size)`` (their rows are its whole dataset: no
DistributedSampler, which would pad with duplicates); when every rank is done, rank 0 publishes each space.

:func:`everywhere` is how the ranks agree: every rank runs a step, and an error on any rank is raised on all of
them (instead of the others waiting in the next collective until the process group times out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from fct_lightning.store import SpaceSpec, SpaceWriter, finalize_space, open_store

log = logging.getLogger(__name__)
T = TypeVar("T")


def _gather(world: int, obj: Any) -> list[Any]:
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def everywhere(world: int, step: Callable[[], T]) -> list[T]:
    """Run ``step`` on this rank and gather every rank's result (it is also a barrier).

    An exception on this rank is raised here after the gathering; one on another rank is raised here too, as the
    same type with the same message (a RuntimeError when that type cannot be rebuilt from its message).
    """
    try:
        result, error, mine = step(), None, None
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        result, error, mine = None, (type(err), str(err)), err
    gathered = _gather(world, (result, error))
    if mine is not None:
        raise mine
    for rank, (_, err) in enumerate(gathered):
        if err is not None:
            kind, message = err
            try:
                raise kind(message)
            except TypeError:
                raise RuntimeError(f"rank {rank}: {kind.__name__}: {message}") from None
    return [r for r, _ in gathered]


class StoreWriter(BasePredictionWriter):
    """Writes ``{space: embeddings}`` predictions of ``(images, rows)`` batches into the spaces of a store.

    Args:
        store: the store's folder; it exists when the predict loop sets up (the datamodule creates it).
        specs: space name -> what it holds (a rerun with equal specs resumes: complete shards are kept).
        overwrite: replace spaces another job (another spec) wrote.

    Attributes:
        pending: after setup, this rank's shards that some space still needs (sorted): its work.
    """

    def __init__(self, store: str | Path, specs: Mapping[str, SpaceSpec], overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.store, self.specs, self.overwrite = Path(store), dict(specs), overwrite
        self.writers: dict[str, SpaceWriter] = {}
        self.pending: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def claim() -> list[int]:
            store = open_store(self.store)
            shards = store.shards_for(trainer.global_rank, trainer.world_size)
            for space, spec in self.specs.items():
                self.writers[space] = SpaceWriter(store, space, spec, shards=shards, overwrite=self.overwrite)
            return sorted(set().union(*(w.pending for w in self.writers.values())))

        self.pending = everywhere(trainer.world_size, claim)[trainer.global_rank]
        log.info("rank %d of %d: %d shard(s) of %s to write", trainer.global_rank, trainer.world_size,
                 len(self.pending), self.store)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        rows = batch[1].cpu().numpy()  # the store rows travel with the batch (not Lightning's batch indices)
        for space, emb in prediction.items():
            self.writers[space].add(rows, emb.cpu().numpy())

    def _close(self, failed: bool) -> None:
        writers, self.writers = self.writers, {}
        errors = []
        for w in writers.values():
            try:
                w.close(failed=failed)
            except Exception as err:  # noqa: BLE001 - every writer lets go of its locks first
                errors.append(err)
        if errors:
            raise errors[0]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Every rank closes its writers; then (all done) rank 0 publishes every space."""
        if stage != "predict" or not self.writers:
            return
        everywhere(trainer.world_size, lambda: self._close(failed=False))

        def publish() -> None:
            if trainer.global_rank == 0:
                for space in self.specs:
                    finalize_space(self.store, space, check_content=False)

        everywhere(trainer.world_size, publish)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(failed=True)  # unfinished shards are dropped, complete ones stay for the rerun
