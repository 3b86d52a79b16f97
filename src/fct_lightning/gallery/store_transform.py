"""``fct-transform --store``: a store's ``old`` (and ``side_info``) shards through h into a new space, resumably.

Three threads overlap: a reader prefetches the next blocks of rows (plain file reads, so memory stays bounded
whatever the shard size; each input shard's sha256 is checked against the manifest before its last block is
given out, so a shard changed on disk is never transformed into a complete output shard), the calling thread
runs h, and a writer thread hands the results to the store's :class:`~fct_lightning.store.SpaceWriter`, which
converts, checks (NaN), hashes and writes each shard atomically. hashlib, file I/O and torch's kernels release
the GIL, so the three share the cores.

Resuming: the output space's spec (h's digest, the precision, the inputs' digests) is the job's identity; the
same command run again (after a kill -9, say) skips the shards that are complete and verified and redoes the
rest, with the same block boundaries, so the result is byte-identical. Work is split by shards: ``shard=(i, n)``
(array jobs: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) or, without it, ``RANK``/``WORLD_SIZE``
from torchrun; each job does shards ``i, i + n, ...``. The job that finds every shard recorded when it is done
publishes the space (the last one to finish); inside an initialised ``torch.distributed`` group, rank 0 does it
after a barrier.

Memory: the writer's buffer for the shard being filled (``shard rows x dim`` of the stored dtype), a few
blocks in flight and h's activations for one block; about 1.2 GB at 1M-row shards, 128-d float32 and blocks
of 8,192 rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct_lightning.devices import resolve_device
from fct_lightning.gallery.jobs import job_part, publish
from fct_lightning.gallery.pipeline import Behind, prefetch
from fct_lightning.gallery.precision import Runner, check_precision, compare, runner
from fct_lightning.gallery.transform import h_output
from fct_lightning.models.transformation import Transformation
from fct_lightning.stages.loading import load_h
from fct_lightning.store import DTYPES, SpaceSpec, SpaceWriter, Store, StoreError, check_space_name
from fct_lightning.store.files import first_non_finite

log = logging.getLogger(__name__)
READ_AHEAD, WRITE_BEHIND = 3, 8
"""Blocks the reader may hold ready, and blocks waiting for the writer (which pauses while it writes a shard)."""
ERROR_ROWS = 2048
"""Rows of the first block on which a lower precision is compared with fp32 (logged, and returned)."""


@dataclass
class StoreTransform:
    """What one fct-transform job did: its shards, the ones it wrote, the rows it computed, whether it published."""

    store: Path
    space: str
    uncertainty_space: str | None
    precision: str
    shards: list[int]
    written: list[int]
    rows: int
    seconds: float
    published: bool
    error: dict[str, float] | None = None

    @property
    def rows_per_s(self) -> float:
        """Rows computed and written per second of this job's wall time."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def check_input(store: Store, space: str, role: str, dim: int, h_meta: dict[str, Any]) -> None:
    """The store's input space ``space`` must be published, of ``role``, ``dim``-d, and from h's own model."""
    what = {"old": "old-model embeddings", "side_info": "side-info features"}[role]
    fix = (f"embed the gallery with the {role} checkpoint h was trained on (fct-embed --checkpoint "
           f"<artifacts>/<dataset>/{role}/best.ckpt --store {store.path}), or import its stored {what} "
           f"(fct-store import --out {store.path} --space {space}=FILE.npy)")
    if space not in store.spaces:
        unfinished = (store.path / space / ".progress" / "space.json").is_file()
        state = " (its writing job did not finish: run it again)" if unfinished else ""
        raise StoreError(f"{store.path} has no space {space!r}{state}; h ({h_meta.get('path')}) needs the items' "
                         f"{what}: {fix}. Spaces there: {sorted(store.spaces) or 'none'}")
    info = store.spaces[space]
    if info.role != role:
        raise StoreError(f"space {space!r} of {store.path} holds {info.role!r} rows, but h's input there must be "
                         f"{what} (role {role!r}): {fix}")
    if info.dim != dim:
        raise StoreError(f"dimension mismatch: space {space!r} of {store.path} holds {info.dim}-d rows, but h "
                         f"({h_meta.get('path')}) takes {dim}-d {what}; they were made by another model: {fix}")
    want = h_meta.get(f"{role}_digest")
    if want and info.checkpoint_digest is None:
        log.warning("space %r of %s does not record which checkpoint made it: it cannot be checked. Its rows must "
                    "come from the %s checkpoint with content digest %s.", space, store.path, role, want)
    elif want and info.checkpoint_digest != want:
        raise StoreError(f"space {space!r} of {store.path} was embedded with the {role} checkpoint of content "
                         f"{info.checkpoint_digest}, but h ({h_meta.get('path')}) was trained on another {role} "
                         f"model (content {want}); h only maps its own {role} model's rows: {fix}, or train a "
                         f"transformation on this {role} model")


def _read_exact(fh: Any, size: int, path: Path) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = fh.readinto(view[got:])
        if not n:
            raise StoreError(f"{path} ends early (at byte {fh.tell()}); the shard was cut short: run fct-store "
                             "verify and rewrite its space")
        got += n
    return buf


def shard_blocks(store: Store, space: str, i: int, batch_rows: int) -> Iterator[np.ndarray]:
    """The ``[<= batch_rows, dim]`` blocks of ``space``'s shard ``i`` as stored (fresh arrays, not memory maps).

    The file's sha256 is checked against the manifest before the last block is yielded, and no block holds a
    NaN or inf row (a StoreError names the item).
    """
    info, shard, path = store.space(space), store.shard(i), store.array_path(space, i)
    head = store.array(space, i)  # the header against the manifest: shape and dtype
    offset, dtype = int(head.offset), head.dtype
    del head
    sha, ready = hashlib.sha256(), None
    with open(path, "rb", buffering=0) as fh:
        sha.update(_read_exact(fh, offset, path))
        for start in range(0, shard.rows, batch_rows):
            n = min(batch_rows, shard.rows - start)
            buf = _read_exact(fh, n * info.dim * dtype.itemsize, path)
            sha.update(buf)
            block = np.frombuffer(buf, dtype).reshape(n, info.dim)
            if (bad := first_non_finite(block)) is not None:
                raise StoreError(f"row {start + bad} of shard {shard.name} of space {space!r} (item "
                                 f"{store.ids(i)[start + bad]!r}, row {shard.start + start + bad} of {store.path}) is "
                                 "not finite; re-embed that item before transforming. Nothing of the shard was kept")
            if ready is not None:
                yield ready
            ready = block
    if f"sha256:{sha.hexdigest()}" != info.sha256[i]:
        raise StoreError(f"{path} does not match its sha256 in the manifest (it changed after space {space!r} was "
                         f"written); nothing of shard {shard.name} was transformed. Run fct-store verify "
                         f"{store.path} and rewrite that space")
    yield ready


def _blocks(store: Store, spaces: list[str], shards: list[int], batch_rows: int,
            as_float32: bool) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """``(shard, offset in it, [one block per space])`` for the shards, spaces read in lockstep."""
    for i in shards:
        offset = 0
        for arrays in zip(*(shard_blocks(store, s, i, batch_rows) for s in spaces), strict=True):
            yield i, offset, [a.astype(np.float32) if as_float32 and a.dtype != np.float32 else a for a in arrays]
            offset += len(arrays[0])


def output_specs(h: Transformation, h_meta: dict[str, Any], store: Store, space: str, precision: str, dtype: str,
                 inputs: list[str]) -> dict[str, SpaceSpec]:
    """The spaces the job writes, by name: ``space``, and ``<space>-uncertainty`` for a FastFill h.

    Their provenance (the job's identity) names h, the precision and the inputs' digests, nothing else: the same
    command run again on another machine or from another folder resumes the same job.
    """
    common = {"command": "fct-transform", "precision": precision, "transformation": h_meta.get("digest"),
              "new_digest": h_meta.get("new_digest"), "dataset": h_meta.get("dataset"),
              "inputs": {s: store.digest(s) for s in inputs}}
    specs = {space: SpaceSpec(role="transformation", dim=h.new_dim, dtype=dtype,
                              checkpoint_digest=h_meta.get("digest"), provenance=common)}
    if h.uncertainty_head is not None:
        unc = f"{space}-uncertainty"
        try:
            check_space_name(unc)
        except StoreError as err:
            raise ValueError(f"--space {space!r} is too long for its uncertainty space {unc!r} ({err})") from err
        specs[unc] = SpaceSpec(role="uncertainty", dim=1, dtype="float32", checkpoint_digest=h_meta.get("digest"),
                               provenance={**common, "describes": space, "note": "FastFill log-variance per item "
                                           "(mean over dimensions): backfill the highest first"})
    return specs


def _stream(writers: list[SpaceWriter], blocks: Iterator[tuple[int, int, list[np.ndarray]]], run: Runner,
            reference: Runner | None, precision: str, dev: torch.device, dtype: str,
            overlap: bool) -> tuple[int, dict | None]:
    """Blocks (read ahead) through h at ``precision`` into the writers (behind); returns the rows computed and,
    with a fp32 ``reference``, the error against it on the first block."""
    out_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    store = writers[0].store

    def write(row: int, pred: np.ndarray, unc: np.ndarray | None) -> None:
        writers[0].add(row, pred)
        if unc is not None:
            writers[1].add(row, unc)

    sink, rows, error = Behind(write, WRITE_BEHIND, overlap), 0, None
    blocks = prefetch(blocks, READ_AHEAD, overlap)
    failed = True
    try:
        for i, offset, arrays in blocks:
            tensors = [torch.from_numpy(a).to(dev).float() for a in arrays]
            old, side = tensors[0], tensors[1] if len(tensors) > 1 else None
            pred, unc = run(old, side)
            if error is None and reference is not None:  # on the first rows only: fp32 is the slow one
                k = min(len(pred), ERROR_ROWS)
                error = compare(reference(old[:k], None if side is None else side[:k])[0], pred[:k])
                log.info("precision %s: max abs error %.3g, relative L2 error %.3g against fp32 on the first block "
                         "(its first %d rows, of shard %s)", precision, error["max_abs"], error["rel_l2"], k,
                         store.shard(i).name)
            sink.put(store.shard(i).start + offset, pred.to(out_dtype).cpu().numpy(),
                     None if unc is None else unc.cpu().numpy())
            rows += len(pred)
        failed = False
    finally:
        blocks.close()  # stops the reader now, not when the traceback lets go of this frame
        sink.close(failed)
    return rows, error


def transform_store(checkpoint: str | Path, store: str | Path, space: str | None = None, precision: str = "fp32",
                    dtype: str = "float32", shard: str | tuple[int, int] | None = None, batch_size: int = 8192,
                    device: str = "auto", overwrite: bool = False) -> StoreTransform:
    """Transform the store's ``old`` (and ``side_info``) rows with the h in ``checkpoint`` into ``space``.

    Args:
        checkpoint: a transformation checkpoint (h is read alone, as :func:`~fct_lightning.stages.load_h` does).
        store: the store folder.
        space: the space to write (default ``fct+side`` for an h with side-info, ``fct`` without; a closed-form h's
            variant's space, ``linear+side``, ``linear`` or ``procrustes``). A FastFill h also writes
            ``<space>-uncertainty``: each item's log-variance, averaged over dims, ``[rows, 1]``.
        precision: ``fp32``, ``bf16`` (autocast on the GPU or CPU) or ``int8`` (dynamic quantisation, CPU);
            recorded in the space's provenance; its error against fp32 on the first block is logged.
        dtype: ``float32`` or ``float16`` on disk.
        shard: ``(i, n)`` or ``"i/n"``: this job does shards ``i, i + n, ...`` (default: RANK/WORLD_SIZE, or all).
        batch_size: rows per forward pass; blocks never span shards.
        device: ``auto`` (the GPU when there is one; the CPU for int8), ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: replace a space of that name written by another job (another h, precision or input).

    Returns:
        What the job did (:class:`StoreTransform`): its shards, those it wrote, rows/s, whether it published.
    """
    h, h_meta = load_h(checkpoint)
    if precision == "int8" and device == "auto":
        device = "cpu"
    return transform_store_with(h, h_meta, store, space, precision, dtype, shard, batch_size, device, overwrite)


def transform_store_with(h: Transformation, h_meta: dict[str, Any], store: str | Path, space: str | None = None,
                         precision: str = "fp32", dtype: str = "float32", shard: str | tuple[int, int] | None = None,
                         batch_size: int = 8192, device: str = "auto", overwrite: bool = False,
                         overlap: bool = True) -> StoreTransform:
    """:func:`transform_store` with h given (in eval mode, with ``h_meta``: ``digest``, ``old_digest``,
    ``side_info_digest``, ``new_digest``, ``path``); ``overlap=False`` reads, computes and writes in turn."""
    started = time.perf_counter()
    st = store if isinstance(store, Store) else Store(store)
    dev = resolve_device(device)
    check_precision(precision, dev)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not stored; use one of {', '.join(DTYPES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size {batch_size!r} must be a positive integer")
    inputs = ["old", "side_info"] if h.has_side_info else ["old"]
    check_input(st, "old", "old", h.old_dim, h_meta)
    if h.has_side_info:
        check_input(st, "side_info", "side_info", h.side_dim, h_meta)
    default = h_output(h, h_meta)[1]
    space = check_space_name(space or default)
    if space in inputs:
        raise ValueError(f"--space {space} is one of h's inputs; write the transformed rows to another space "
                         f"(default {default})")
    specs = output_specs(h, h_meta, st, space, precision, dtype, inputs)
    unc_space = next(iter(list(specs)[1:]), None)
    part = job_part(shard)
    mine = st.shards_for(*part)
    h = h.to(dev).eval()
    run, reference = runner(h, precision, dev), runner(h, "fp32", dev) if precision != "fp32" else None
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(SpaceWriter(st, name, spec, mine, overwrite)) for name, spec in specs.items()]
        todo = sorted(set().union(*(w.pending for w in writers)))
        log.info("fct-transform: %s of %s (%d rows, %d shards): job %d of %d does %d shards, %d to write; h %s, %s "
                 "on %s, %s", space, st.path, st.rows, len(st.shards), part[0], part[1], len(mine), len(todo),
                 h_meta.get("path"), precision, dev, dtype)
        rows, error = _stream(writers, _blocks(st, inputs, todo, batch_size, dev.type == "cpu"), run,
                              reference, precision, dev, dtype, overlap)
        written = writers[0].written
    published = publish(writers, part)
    seconds = time.perf_counter() - started
    log.info("fct-transform: %d rows in %.1f s (%.0f rows/s), %d shards written%s", rows, seconds,
             rows / seconds if seconds else 0, len(written), "; space published" if published else "")
    return StoreTransform(st.path, space, unc_space, precision, mine, written, rows, seconds, published, error)
