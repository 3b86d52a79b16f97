"""Cached frozen-model features for training the transformation h without touching images every step.

One pass embeds ``K`` seeded augmented views of every training image with the frozen old, side-info and new
models; h then trains on these tensors for as many epochs as it likes. The cache lives in
``<cache_dir>/<key>/features.pt`` where ``key`` hashes the three checkpoints' *contents*, the dataset, its
root and training folder, the data path (per-item or in-memory augmentation), the classes, the image size, ``K``,
the augmentation seed and the storage dtype: a retrained model gives a new key, so a stale cache is never reused.
Under DDP each rank embeds its own share of the items, rank 0 merges the parts.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from fct_lightning.data.sampling import single_item_tail

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """A feature cache on disk that cannot be used (corrupt, incomplete); the message says what to delete."""

SPACES = ("old", "side", "new")
ROLES = {"old": "old model", "side": "side-info model", "new": "new model"}


def cache_key(**fields: Any) -> str:
    """Stable short hash of the fields that decide a cache's contents."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
def embed_views(
    datamodule: Any,
    models: dict[str, nn.Module],
    *,
    split: str,
    classes: list[int] | None,
    views: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """Embed ``views`` seeded augmentations of this rank's share of ``split``.

    Features are stored in ``dtype``, except those of a model whose values exceed its range (float16 ends at
    65504; a barely trained network in eval mode can go beyond): that model's features are kept in float32
    instead, with a warning, rather than turned into infinities.

    Returns:
        ``{"index": [n], "labels": [n], space: [views, n, d]}`` for each model name in ``models``, on CPU.

    Raises:
        ValueError: If a model gives NaN or infinite embeddings (its checkpoint is unusable).
    """
    out: dict[str, list[Tensor]] = {name: [] for name in models}
    store = dict.fromkeys(models, dtype)
    index: list[Tensor] = []
    labels: list[Tensor] = []
    for k in range(views):
        loader = datamodule.eval_dataloader(split, classes=classes, augment=True, views=1, seed=seed)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(k)
        else:
            loader.dataset.set_epoch(k)
        if world_size > 1 and isinstance(loader, DataLoader):
            share = Subset(loader.dataset, range(rank, len(loader.dataset), world_size))
            loader = DataLoader(share, batch_size=loader.batch_size, num_workers=loader.num_workers)
        per_model: dict[str, list[Tensor]] = {name: [] for name in models}
        for images, y, idx in loader:
            images = images.to(device, non_blocking=True)
            for name, model in models.items():
                f = model(images).float()
                peak = float(f.abs().amax()) if f.numel() else 0.0
                if not math.isfinite(peak):
                    raise ValueError(
                        f"the frozen {ROLES.get(name, name)} gives NaN or infinite embeddings for training images; "
                        "its checkpoint cannot be used: retrain that stage (a lower --model.lr, or "
                        "--trainer.gradient_clip_val 1.0, keeps it finite)")
                if store[name].is_floating_point and peak > torch.finfo(store[name]).max:
                    log.warning("the %s's features reach %.3g, beyond %s: caching them in float32",
                                ROLES.get(name, name), peak, store[name])
                    store[name] = torch.float32
                    out[name] = [t.float() for t in out[name]]
                    per_model[name] = [t.float() for t in per_model[name]]
                per_model[name].append(f.to("cpu", store[name]))
            if k == 0:
                index.append(idx.cpu())
                labels.append(y.cpu())
        for name in models:
            out[name].append(torch.cat(per_model[name]))
    result = {"index": torch.cat(index), "labels": torch.cat(labels)}
    result.update({name: torch.stack(parts) for name, parts in out.items()})
    return result


def merge_parts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-rank parts, order the items by index and drop repeats.

    Repeats come from loaders that shard themselves with padding (the in-memory loader under DDP); the lowest
    rank's copy is kept. (In memory the augmentation is drawn per rank and batch, so the copies may differ; the
    cache key holds the world size and batch size for that reason.)
    """
    index = torch.cat([p["index"] for p in parts])
    order = torch.argsort(index, stable=True)
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    order = order[keep]
    merged = {"index": index[order], "labels": torch.cat([p["labels"] for p in parts])[order]}
    for name in parts[0]:
        if name not in merged:  # a rank may have widened a model's features to float32 (see embed_views)
            dtype = functools.reduce(torch.promote_types, [p[name].dtype for p in parts])
            merged[name] = torch.cat([p[name].to(dtype) for p in parts], dim=1)[:, order]
    if not torch.equal(merged["index"], torch.arange(len(merged["index"]))):
        raise CacheError("feature cache parts do not cover every item exactly once; delete the cache and rerun")
    return merged


def build_or_load(
    cache_dir: str | Path,
    key: str,
    compute: Callable[[], dict[str, Tensor]],
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, Tensor]:
    """Load ``<cache_dir>/<key>/features.pt`` or compute it (each rank its part, rank 0 merges).

    Separate jobs that want the same cache at once (`make -j` training h with and without the uncertainty head,
    single-process or DDP) take turns on a file lock held by their rank 0: the first builds the cache, the others
    then load it. The ranks of one DDP job wait for their rank 0 at a barrier, then see the same cache state;
    their parts carry the job's token (written by rank 0 under the lock) and appear atomically, so two jobs never
    read or delete each other's parts. A job waiting for another's build waits at that barrier, within the
    process group's timeout.
    """
    folder = Path(cache_dir) / key
    path = folder / "features.pt"
    folder.mkdir(parents=True, exist_ok=True)
    token_file = folder / "job.token"
    with _exclusive(folder / "build.lock") if rank == 0 else contextlib.nullcontext():
        if world_size > 1:
            if rank == 0:
                token_file.write_text(f"{os.getpid()}-{time.time_ns()}")
            barrier()  # every rank now sees the state rank 0 locked: the cache is there or this job builds it
        if path.is_file():
            log.info("reusing feature cache %s", path)
        else:
            part = compute()
            token = token_file.read_text().strip() if world_size > 1 else ""
            names = [folder / f"part-{token}-{r}-of-{world_size}.pt" for r in range(world_size)]
            if world_size > 1:
                tmp = names[rank].with_name(names[rank].name + ".tmp")
                torch.save(part, tmp)
                tmp.replace(names[rank])
                barrier()
            if rank == 0:
                parts = [part] if world_size == 1 else [torch.load(n, weights_only=True) for n in names]
                tmp = folder / f"features.pt.{os.getpid()}.tmp"
                torch.save(merge_parts(parts), tmp)
                tmp.replace(path)
                for n in names:
                    n.unlink(missing_ok=True)
                log.info("feature cache written to %s", path)
            barrier()
    try:
        return torch.load(path, weights_only=True)  # tensors only: a crafted cache cannot run code
    except Exception as err:
        asked = re.search(r"GLOBAL (\S+)", str(err))
        why = (f"it asks for a Python object a feature cache never holds ({asked.group(1) if asked else 'unknown'}), "
               "so it was not loaded" if str(err).startswith("Weights only load failed") else f"it is corrupt ({err})")
        raise CacheError(f"the feature cache {path} cannot be used: {why}; delete {folder} and rerun") from err


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (other processes block until it is released)."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class FeatureBatches:
    """Mini-batches of cached features for one rank: each epoch a seeded permutation of the items, each item
    with one of its ``K`` views drawn at random, shards disjoint across ranks (padded to equal length).

    Yields dicts ``{"old", "side", "new": [B, d] float32, "labels": [B], "index": [B]}`` on ``device``.
    """

    def __init__(
        self,
        features: dict[str, Tensor],
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.spaces = [s for s in SPACES if s in features]
        self.data = {s: features[s].to(self.device) for s in self.spaces}
        self.labels = features["labels"].to(self.device)
        self.views, self.n = self.data[self.spaces[0]].shape[:2]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0
        self.per_rank = -(-self.n // world_size)
        # a one-item last batch is left out of each epoch: h's BatchNorm1d cannot train on one item
        self.served = self.per_rank - int(single_item_tail(self.per_rank, batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.served + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen)
        perm = torch.cat([perm, perm[: self.per_rank * self.world_size - self.n]])[self.rank :: self.world_size]
        perm = perm[: self.served]
        view = torch.randint(self.views, (self.n,), generator=gen)
        perm, view = perm.to(self.device), view.to(self.device)
        for start in range(0, len(perm), self.batch_size):
            idx = perm[start : start + self.batch_size]
            v = view[idx]
            batch = {s: self.data[s][v, idx].float() for s in self.spaces}
            batch.update(labels=self.labels[idx], index=idx)
            yield batch
