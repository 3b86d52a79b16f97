"""``fct-transform``: stored old embeddings (and side-info) -> the new model's space with h, no images read.

This module is the one-file form (``--old x.npy --out y.npy``); a store's shards, resumable and split over jobs,
go through :mod:`fct_lightning.gallery.store_transform` (``--store``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fct_lightning import chain
from fct_lightning.devices import resolve_device
from fct_lightning.gallery.files import (
    FORMAT,
    check_out,
    copy_companions,
    load_array,
    publish,
    read_ids,
    read_meta,
    refuse_collisions,
    sidecar,
    write_json,
    writing,
)
from fct_lightning.stages.loading import load_h

log = logging.getLogger(__name__)


def h_output(h: Any, h_meta: dict[str, Any]) -> tuple[str, str]:
    """``(stage, default space)`` of what h writes: the FCT MLP h's ``transformation`` and ``fct+side`` (``fct``
    without side-info); a closed-form h's own stage and its variant's gallery space in the registry
    (``linear+side``, ``linear``, ``procrustes``), found from the options its checkpoint records (a variant without
    one: the space it backfills, else its name)."""
    kind = getattr(h, "kind", None)  # a closed-form map's family (the MLP h has none)
    stage = h_meta.get("stage") or ("transformation" if kind is None else "closed_form")
    if stage == "transformation":
        return stage, "fct+side" if h.has_side_info else "fct"
    variant = chain.variant_of(stage, {"family": kind, "use_side_info": h.has_side_info, **h_meta})
    spaces = [s.name for s in variant.spaces if s.embed == "gallery"]
    return stage, spaces[0] if spaces else variant.backfill or variant.name


def _check_input(arr: np.ndarray, path: Path, role: str, dim: int, h_meta: dict[str, Any]) -> dict[str, Any] | None:
    """Dimension and provenance of one stored input of h (``old`` or ``side_info``); returns its description."""
    what = {"old": "old-model embeddings", "side_info": "side-info features"}[role]
    if arr.shape[1] != dim:
        raise ValueError(
            f"dimension mismatch: {path} holds {arr.shape[1]}-d rows, but this transformation takes {dim}-d "
            f"{what} (its {role} model's size); these were made by another model. Embed with the {role} "
            f"checkpoint the transformation was trained on ({h_meta.get('path')}).")
    meta = read_meta(path, len(arr))
    want = h_meta.get(f"{role}_digest")
    if meta is None:
        log.warning("%s has no %s next to it: which model made these rows cannot be checked. They must come from "
                    "the %s checkpoint with content digest %s.", path, sidecar(path, "meta").name, role, want)
        return None
    if meta.get("stage") != role:
        raise ValueError(f"{path} holds '{meta.get('stage')}' embeddings (see {sidecar(path, 'meta').name}); "
                         f"this input needs {what}: embed the gallery with the {role} checkpoint.")
    if want and meta.get("digest") != want:
        raise ValueError(
            f"{path} was embedded with the {role} checkpoint {meta.get('checkpoint')} (content {meta.get('digest')}), "
            f"but the transformation {h_meta.get('path')} was trained on another {role} model (content {want}). "
            f"h only maps the embeddings of its own {role} model: embed with that checkpoint, or train a "
            f"transformation on this {role} model.")
    return meta


def _same_items(old: Path, old_meta: dict[str, Any] | None, side: Path, side_meta: dict[str, Any] | None) -> None:
    """Old embeddings and side-info must list the same items in the same order (judged by content, not paths)."""
    if not old_meta or not side_meta:
        return
    kinds = ("ids" if old_meta.get("ids") else "labels", "ids" if side_meta.get("ids") else "labels")
    if kinds[0] != kinds[1]:
        raise ValueError(f"{old} and {side} describe their rows differently (one from image files, one from a "
                         "dataset split); embed both from the same folder or split")
    if kinds[0] == "ids":
        a, b = sidecar(old, "ids"), sidecar(side, "ids")
        for row, (x, y) in enumerate(zip_longest(read_ids(a), read_ids(b))):
            if x != y:
                raise ValueError(f"row {row} is {x!r} in {a} but {y!r} in {b}: the old embeddings and the side-info "
                                 "list other items, or the same in another order. Embed both from the same folder "
                                 "(fct-embed lists the files in sorted order).")
        return
    src_a, src_b = old_meta.get("source") or {}, side_meta.get("source") or {}
    same_split = (src_a.get("dataset"), src_a.get("split")) == (src_b.get("dataset"), src_b.get("split"))
    labels = [np.load(sidecar(p, "labels"), mmap_mode="r", allow_pickle=False) for p in (old, side)]
    if not same_split or not np.array_equal(*labels):
        raise ValueError(f"{old} and {side} were embedded from different items ({src_a.get('dataset')}/"
                         f"{src_a.get('split')} vs {src_b.get('dataset')}/{src_b.get('split')}, or other labels); "
                         "embed both from the same split")


def _finite_rows(arr: np.ndarray, start: int, stop: int, path: Path) -> Tensor:
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes inf, refused below
        chunk = np.array(arr[start:stop], dtype=np.float32)  # a copy: the input is a read-only memory map
    ok = np.isfinite(chunk).all(axis=1)
    if not ok.all():
        row = start + int(np.argmin(ok))
        raise ValueError(f"row {row} of {path} is not finite (NaN or inf, or beyond float32's range); re-embed that "
                         "item (or drop it from the gallery) before transforming. Nothing was written.")
    return torch.from_numpy(chunk)


@torch.no_grad()
def transform(
    checkpoint: str | Path,
    old: str | Path,
    out: str | Path,
    side: str | Path | None = None,
    uncertainty_out: str | Path | None = None,
    batch_size: int = 8192,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Map stored old embeddings (and side-info) into the new model's space with h; write ``out`` (``.npy``).

    ``uncertainty_out`` (FastFill h only): each item's predicted log-variance, ``[N]``; backfill the highest
    first. Inputs are read ``batch_size`` rows at a time from memory-mapped files.
    """
    started = time.perf_counter()
    out = check_out(out, overwrite)
    unc_out = check_out(uncertainty_out, overwrite, "--uncertainty_out") if uncertainty_out is not None else None
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    old_path, side_path = Path(old), None if side is None else Path(side)
    outputs = {"--out": out, **({"--uncertainty_out": unc_out} if unc_out is not None else {})}
    refuse_collisions(outputs, [old_path, *([side_path] if side_path else [])])
    if unc_out is not None and unc_out.resolve() == out.resolve():
        raise ValueError("--uncertainty_out must be another file than --out")
    dev = resolve_device(device)
    h, h_meta = load_h(checkpoint)
    old_arr = load_array(old_path, "old embeddings")
    old_meta = _check_input(old_arr, old_path, "old", h.old_dim, h_meta)
    side_arr = side_meta = None
    if h.has_side_info:
        if side_path is None:
            raise ValueError(f"the transformation {checkpoint} uses side-info: pass the stored side-info features "
                             "with --side (fct-embed --checkpoint <artifacts>/<dataset>/side_info/best.ckpt)")
        side_arr = load_array(side_path, "side-info")
        side_meta = _check_input(side_arr, side_path, "side_info", h.side_dim, h_meta)
        if len(side_arr) != len(old_arr):
            raise ValueError(f"{old_path} has {len(old_arr)} rows but {side_path} has {len(side_arr)}: the old "
                             "embeddings and the side-info must list the same items")
        _same_items(old_path, old_meta, side_path, side_meta)
    elif side_path is not None:
        raise ValueError(f"the transformation {checkpoint} was trained without side-info (h(old) alone); leave "
                         "--side out, or use the side-info transformation")
    if unc_out is not None and h.uncertainty_head is None:
        raise ValueError(f"--uncertainty_out needs a FastFill transformation (trained with --model.uncertainty "
                         f"true); {checkpoint} has no uncertainty head")
    h.to(dev)
    rows = len(old_arr)
    with writing(out) as tmp, (writing(unc_out) if unc_out is not None else _nothing()) as unc_tmp:
        res = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, h.new_dim))
        unc = None if unc_tmp is None else np.lib.format.open_memmap(unc_tmp, mode="w+", dtype=np.float32,
                                                                      shape=(rows,))
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            o = _finite_rows(old_arr, start, stop, old_path).to(dev)
            s = None if side_arr is None else _finite_rows(side_arr, start, stop, side_path).to(dev)
            if unc is not None:
                pred, log_var = h.forward_with_uncertainty(o, s)
                unc[start:stop] = log_var.float().reshape(len(pred), -1).mean(dim=1).cpu().numpy()
            else:
                pred = h(o, s)
            res[start:stop] = pred.float().cpu().numpy()
        res.flush()
        del res
        fps = {"out": publish(tmp, out)}
        if unc is not None:
            unc.flush()
            del unc
            fps["unc"] = publish(unc_tmp, unc_out)
    companions = copy_companions(old_path, old_meta, out)
    inputs = {"old": {"path": str(old_path.resolve()), "digest": (old_meta or {}).get("digest")}}
    if side_path is not None:
        inputs["side_info"] = {"path": str(side_path.resolve()), "digest": (side_meta or {}).get("digest")}
    common = {"format": FORMAT, "checkpoint": h_meta["path"], "digest": h_meta["digest"], "rows": rows,
              "dtype": "float32", "dataset": h_meta.get("dataset"), "source": (old_meta or {}).get("source"),
              "inputs": inputs}
    stage, space = h_output(h, h_meta)
    role = {} if stage == "transformation" else {"role": "transformation"}  # its store role (fct-store import)
    write_json(sidecar(out, "meta"), {
        **common, "stage": stage, **role, "space": space,
        "new_digest": h_meta.get("new_digest"), "embedding_dim": h.new_dim, "fingerprint": fps["out"],
        **companions, "uncertainty": None if unc_out is None else str(unc_out.resolve()),
    })
    if unc_out is not None:
        write_json(sidecar(unc_out, "meta"), {
            **common, "stage": "uncertainty", "describes": str(out.resolve()), "fingerprint": fps["unc"],
            "note": "FastFill log-variance per row (mean over dimensions): backfill the highest first",
        })
    log.info("transformed %d rows with %s in %.1f s", rows, checkpoint, time.perf_counter() - started)
    return out


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield None
