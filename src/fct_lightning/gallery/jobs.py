"""Splitting a store job over processes by shards, and publishing its spaces once every shard is written.

A job is ``(index, jobs)``: it does shards ``index, index + jobs, ...``. ``--shard i/n`` sets it (array jobs:
``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``); without it, an initialised ``torch.distributed`` group or
torchrun's ``RANK``/``WORLD_SIZE`` do. The spaces are published by rank 0 after a barrier in a process group, else
by the job that finds every shard recorded when it is done (the last one to finish, whatever the order).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from fct_lightning.store import SpaceWriter, finalize_space
from fct_lightning.store.files import read_json

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (``--shard``) as ``(i, n)``, with ``0 <= i < n``."""
    i, sep, n = str(text).partition("/")
    try:
        part = (int(i), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 0 <= part[0] < part[1]:
        raise ValueError(f"--shard {text!r} must be i/n with 0 <= i < n (this job's index and the number of jobs), "
                         "e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT or --shard $RANK/$WORLD_SIZE")
    return part


def _dist() -> Any:
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def job_part(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """This job's ``(index, jobs)``: ``shard``, else the torch.distributed group, else RANK/WORLD_SIZE, else (0, 1)."""
    if shard is not None:
        return parse_shard(shard) if isinstance(shard, str) else parse_shard(f"{shard[0]}/{shard[1]}")
    if (dist := _dist()) is not None:
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return parse_shard(f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}")
    return 0, 1


def all_recorded(writer: SpaceWriter) -> bool:
    """Whether every shard of the space has a completion record of this job (written by any process)."""
    for shard in writer.store.shards:
        rec = read_json(writer.progress / f"{shard.name}.json")
        if not isinstance(rec, dict) or rec.get("job") != writer.key or rec.get("rows") != shard.rows:
            return False
    return True


def publish(writers: list[SpaceWriter], part: tuple[int, int]) -> bool:
    """Publish the spaces once every shard is written: rank 0 after a barrier in a process group, else whoever
    finds every shard recorded (the last job to finish)."""
    if (dist := _dist()) is not None:
        dist.barrier()
        if dist.get_rank() == 0:
            for w in writers:
                finalize_space(w.store, w.space)
        dist.barrier()
        return dist.get_rank() == 0
    if not all(all_recorded(w) for w in writers):
        log.info("job %d of %d is done; the space is published by the job that finishes last (or run any job "
                 "again once all are done)", *part)
        return False
    for w in writers:
        finalize_space(w.store, w.space)
    return True


