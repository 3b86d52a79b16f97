"""``fct-backfill --store``: re-embed the items FastFill would backfill first with the new model, as a new space.

A round reads the transformed gallery space (``fct+side``, written by fct-transform) or an earlier round's output,
chooses rows, re-embeds only their images with the new model, and writes a new space in which exactly those rows
hold new-model embeddings and every other row is copied bit for bit from the input. The input is never modified.

Which rows: a *policy* orders all rows, as fct-eval's backfilling curves do (:mod:`fct_lightning.backfill`):

* ``uncertainty``: FastFill's predicted log-variance, highest first, ties by row (the ``<base>-uncertainty``
  space fct-transform writes for a FastFill h; computed with h from ``old``/``side_info`` when it is absent);
* ``random``: ``torch.randperm`` seeded with ``seed`` (the order of fct-eval's ``random`` curve for that seed);
* ``list``: a file of ids (one per line, a ``.jsonl``/``.ids.txt`` of JSON strings, or ``FILE.parquet:COLUMN``),
  first first.

``fraction`` is the *cumulative* target: after the round ``floor(fraction * N + 0.5)`` rows hold new-model
embeddings, counting earlier rounds'; rows already backfilled are never chosen again, so round 2 at 0.2 after
round 1 at 0.1 adds the next 10% of the same order (with the same policy and seed, the backfilled set is then
exactly the first 20% of the order, as on fct-eval's curve). ``list`` without ``fraction`` backfills every listed
id not yet backfilled.

Per-row provenance: the output space has a row column ``source`` (int16; ``STORE/<space>.columns/``, beside the
space's folder so that embedding-reader still reads ``STORE/<space>/`` as it is): 0 = h's transformed vector,
``k >= 1`` = the new model's embedding, written in round ``k``. The space's provenance names the models (h's and
the new checkpoint's digests), the policy, fraction, seed, list digest, round, and a digest of the chosen rows.

Resuming: that provenance is the job's identity; the same command run again (after a kill -9, say) skips shards
that are complete and verified and redoes the rest with the same batches, so the result is byte-identical. Jobs
split by shards like fct-transform (``shard="i/n"``, or RANK/WORLD_SIZE); each computes the same choice.

Live index (ids = global store rows): after a round, :func:`fct_lightning.index.update_index` replaces the round's
rows in place; an on-disk index is searched with a delta index of the backfilled rows
(:func:`fct_lightning.index.search_with_delta`). See :mod:`fct_lightning.index.live`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from fct_lightning.backfill import POLICIES as ORDERS
from fct_lightning.backfill import UncertaintyPolicy, backfill_count, get_policy, uncertainty_order
from fct_lightning.devices import resolve_device
from fct_lightning.gallery.items import SplitItems
from fct_lightning.gallery.jobs import job_part, publish
from fct_lightning.gallery.store_embed import load_models
from fct_lightning.gallery.store_transform import check_input, shard_blocks
from fct_lightning.models.transformation import Transformation
from fct_lightning.stages.loading import load_h
from fct_lightning.store import (
    SOURCE,
    SpaceSpec,
    SpaceWriter,
    Store,
    StoreError,
    check_space_name,
    read_ids,
    read_source,
)

log = logging.getLogger(__name__)
# the deployable orders of FastFill's head (uncertainty: most uncertain first, confident: least), from the registry
UNCERTAINTY_POLICIES = tuple(n for n, c in ORDERS.items() if issubclass(c, UncertaintyPolicy))
POLICIES = (*UNCERTAINTY_POLICIES, "random", "list")


@dataclass
class StoreBackfill:
    """What one fct-backfill job did: the round, the rows it chose, the shards it wrote, whether it published."""

    store: Path
    space: str
    from_space: str
    round: int
    policy: str
    chosen: np.ndarray
    backfilled: int
    shards: list[int]
    written: list[int]
    embedded: int
    seconds: float
    published: bool


def backfill_order(policy: str, n: int, seed: int = 0, uncertainty: np.ndarray | None = None) -> np.ndarray:
    """All ``n`` rows in ``policy``'s order (int64), as :mod:`fct_lightning.backfill`'s policies order them:
    ``random`` = ``torch.randperm(n)`` seeded with ``seed``; ``uncertainty`` = highest first, ``confident`` =
    lowest first, ties by row (:func:`~fct_lightning.backfill.uncertainty_order`)."""
    if policy == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    if policy in UNCERTAINTY_POLICIES:
        if uncertainty is None or uncertainty.shape != (n,):
            raise ValueError(f"policy {policy!r} needs one value per row ([{n}])")
        first = get_policy(policy).most_uncertain_first
        return uncertainty_order(torch.from_numpy(uncertainty.astype(np.float32)), first).numpy()
    raise ValueError(f"--policy {policy!r}: an order is computed for {', '.join(POLICIES[:-1])}; list reads a file")


def choose_rows(order: np.ndarray, source: np.ndarray, target: int) -> np.ndarray:
    """The rows to backfill now (sorted): the first rows of ``order`` not backfilled yet (``source == 0``), as many as
    bring the backfilled rows to ``target``."""
    done = int(np.count_nonzero(source))
    free = order[source[order] == 0]
    if target - done > len(free):
        raise ValueError(f"{target - done} more rows are needed to reach {target} backfilled rows, but the order "
                         f"offers only {len(free)} not backfilled yet; give a smaller --fraction or a longer --list")
    return np.sort(free[:max(target - done, 0)])


def list_rows(store: Store, spec: str | Path) -> tuple[np.ndarray, str]:
    """The rows of the ids listed in ``spec`` (file order) and the list's sha256; unknown or repeated ids are an
    error naming the first one."""
    listed = list(read_ids(spec))
    position: dict[str, int] = {}
    for k, item in enumerate(listed):
        if item in position:
            raise ValueError(f"--list {spec}: id {item!r} is listed twice (entries {position[item] + 1} and {k + 1}); "
                             "list each id once")
        position[item] = k
    rows = np.full(len(listed), -1, np.int64)
    for i, shard in enumerate(store.shards):
        for local, item in enumerate(store.ids(i)):
            if (k := position.get(item)) is not None:
                rows[k] = shard.start + local
    if (rows < 0).any():
        k = int(np.argmax(rows < 0))
        raise ValueError(f"--list {spec}: {int((rows < 0).sum())} of its {len(listed)} ids are not items of "
                         f"{store.path}, the first {listed[k]!r} (entry {k + 1}); list ids of the store (its meta "
                         "column 'id')")
    if not len(rows):
        raise ValueError(f"--list {spec} lists no ids; give one id per line")
    digest = hashlib.sha256("\n".join(listed).encode()).hexdigest()
    return rows, f"sha256:{digest}"


def _check_fraction(fraction: float | None, policy: str) -> None:
    if fraction is None:
        if policy != "list":
            raise ValueError(f"--policy {policy} needs --fraction F in (0, 1]: the share of the gallery backfilled "
                             "after this round, counting earlier rounds")
        return
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction!r} must be a number in (0, 1]: the share of the gallery backfilled "
                         "after this round, counting earlier rounds (0.1, then 0.2 adds another 10%)")


def _check_models(h_meta: dict[str, Any], new_meta: dict[str, Any]) -> None:
    """The new checkpoint must be the model h was trained toward."""
    want = h_meta.get("new_digest")
    if new_meta.get("stage") != "new" or (want and new_meta["digest"] != want):
        raise ValueError(f"--checkpoint {new_meta.get('path')} is a '{new_meta.get('stage')}' checkpoint of content "
                         f"{new_meta.get('digest')}, but h ({h_meta.get('path')}) was trained toward the new model of "
                         f"content {want}; backfilled rows must come from that model: pass its checkpoint "
                         "(artifacts/<dataset>/new/best.ckpt of h's chain)")
    if not want:
        log.warning("h (%s) does not record which new model it was trained toward: --checkpoint %s cannot be checked",
                    h_meta.get("path"), new_meta.get("path"))


def check_from_space(store: Store, space: str, h_meta: dict[str, Any], new_digest: str) -> tuple[str, int]:
    """``(base space, round)`` of the input space: a transformed space of h (round 0) or an earlier round's output
    of the same h and new model; anything else is an error naming the fix."""
    fix = (f"transform the gallery with this h first (fct-transform --checkpoint {h_meta.get('path')} --store "
           f"{store.path}), or pass the h that made it")
    if space not in store.spaces:
        raise StoreError(f"{store.path} has no space {space!r} to backfill (spaces there: "
                         f"{sorted(store.spaces) or 'none'}); {fix}")
    info = store.space(space)
    if info.role not in ("transformation", "backfill"):
        raise StoreError(f"space {space!r} of {store.path} holds {info.role!r} rows, not h's transformed gallery; "
                         "pass --space the transformed space (fct+side, or fct without side-info)")
    if info.checkpoint_digest != h_meta["digest"]:
        raise StoreError(f"space {space!r} of {store.path} was made by the transformation of content "
                         f"{info.checkpoint_digest}, not by h ({h_meta.get('path')}, content {h_meta['digest']}); "
                         f"{fix}")
    if info.role == "transformation":
        return space, 0
    prov = info.provenance
    if prov.get("new_digest") != new_digest or SOURCE not in info.columns:
        raise StoreError(f"space {space!r} of {store.path} was backfilled with the new model of content "
                         f"{prov.get('new_digest')}, not {new_digest}; backfill its base space "
                         f"{prov.get('base')!r} instead")
    return str(prov["base"]), int(prov["round"])


def _whole(store: Store, space: str, i: int) -> np.ndarray:
    """Shard ``i`` of ``space`` as stored, checked against its sha256 in the manifest (and finite)."""
    return np.concatenate(list(shard_blocks(store, space, i, 1 << 16)))


def uncertainty_of(store: Store, base: str, h: Transformation, h_meta: dict[str, Any],
                   batch_size: int) -> tuple[np.ndarray, str | None]:
    """FastFill's log-variance per row (float32 ``[N]``) and the digest of the space it came from: fct-transform's
    ``<base>-uncertainty`` when it is h's, else computed now with h from the ``old`` (and ``side_info``) spaces."""
    name = f"{base}-uncertainty"
    info = store.spaces.get(name)
    if info is not None and (info.role, info.dim, info.checkpoint_digest) == ("uncertainty", 1, h_meta["digest"]):
        return np.concatenate([_whole(store, name, i)[:, 0] for i in range(len(store.shards))]), store.digest(name)
    if h.uncertainty_head is None:
        raise ValueError(f"--policy uncertainty/confident needs FastFill's per-item uncertainty, but h "
                         f"({h_meta.get('path')}) has no uncertainty head; train the transformation with "
                         "--model.uncertainty true (artifacts/<dataset>/fastfill), or use --policy random")
    log.info("space %r is not there (or not h's): computing the uncertainty with h from the store's old%s rows",
             name, " and side_info" if h.has_side_info else "")
    check_input(store, "old", "old", h.old_dim, h_meta)
    if h.has_side_info:
        check_input(store, "side_info", "side_info", h.side_dim, h_meta)
    parts = []
    for i in range(len(store.shards)):
        old = torch.from_numpy(_whole(store, "old", i)).float()
        side = torch.from_numpy(_whole(store, "side_info", i)).float() if h.has_side_info else None
        parts.append(h.transform_stored(old, side, batch_size, uncertainty=True, out_device="cpu")[1].numpy())
    return np.concatenate(parts).astype(np.float32), None


def _items_source(store: Store, images: str | Path | None, split: str | None) -> tuple[str | Path | None, str | None]:
    """Where the items' images are: as given, else as the store recorded when fct-embed created it."""
    if images is not None or split is not None:
        return images, split
    prov = store.manifest.get("provenance") or {}
    if prov.get("images"):
        return prov["images"], None
    if prov.get("split"):
        return None, prov["split"]
    raise ValueError(f"give --images DIR or --split S: where the images of the items of {store.path} are (the store "
                     "does not record it)")


def _positions(store: Store, items: Any, i: int, local: np.ndarray) -> list[int]:
    """What ``items.dataset(store)`` is indexed by for rows ``local`` of shard ``i``: store rows for image files, the
    positions in the split (from ids ``<split>/<index>``) for a split."""
    start = store.shard(i).start
    if not isinstance(items, SplitItems):
        return (start + local).tolist()
    ids, out = store.ids(i), []
    for r in local.tolist():
        head, _, pos = ids[r].rpartition("/")
        if head != items.split or not pos.isdigit():
            raise ValueError(f"row {start + r} of {store.path} has id {ids[r]!r}, not '{items.split}/<index>': the "
                             f"store does not hold items of split {items.split!r} (fct-embed --store --split names "
                             "them so); pass the split it was made from, or --images DIR for a store of image files")
        out.append(int(pos))
    return out


@torch.no_grad()
def _embed_rows(module: Any, dataset: Any, positions: list[int], batch_size: int, num_workers: int,
                dev: torch.device) -> np.ndarray:
    loader = DataLoader(Subset(dataset, positions), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    parts = [module.query_embed(x.to(dev, non_blocking=True)).float().cpu().numpy() for x in loader]
    return np.concatenate(parts) if parts else np.empty((0, int(module.embedding_dim)), np.float32)


def backfill_store(store: str | Path, h_checkpoint: str | Path, new_checkpoint: str | Path, policy: str,
                   fraction: float | None = None, from_space: str | None = None, out_space: str | None = None,
                   images: str | Path | None = None, split: str | None = None, data_root: str | None = None,
                   list_path: str | Path | None = None, seed: int = 0, shard: str | tuple[int, int] | None = None,
                   batch_size: int | None = None, num_workers: int | None = None, device: str = "auto",
                   overwrite: bool = False) -> StoreBackfill:
    """One backfilling round on a store: the chosen rows re-embedded by the new model, into a new space.

    Args:
        store: the store folder.
        h_checkpoint: the transformation that made ``from_space`` (a FastFill h for the ``uncertainty`` and
            ``confident`` policies).
        new_checkpoint: the new model h was trained toward (its ``new/best.ckpt``); it embeds the chosen images.
        policy: ``uncertainty``, ``random`` or ``list`` (see the module's docstring).
        fraction: cumulative share of the gallery backfilled after this round, in (0, 1] (optional for ``list``).
        from_space: the input: h's transformed space (default ``fct+side``, ``fct`` for h without side-info) or an
            earlier round's output. Never modified.
        out_space: the space to write (default ``<base>-bf<round>``, e.g. ``fct+side-bf1``, then ``fct+side-bf2``).
        images: the folder of the items' image files (ids = paths relative to it), or
        split: the dataset split of the items (ids ``<split>/<index>``); default: what the store recorded.
        data_root: where the dataset is, for ``split`` (default: where the new model was trained).
        list_path: the ids for ``policy="list"``.
        seed: the seed of ``policy="random"``.
        shard: ``(i, n)`` or ``"i/n"``: this job does shards ``i, i + n, ...`` (default: RANK/WORLD_SIZE, or all).
        batch_size: images per forward pass (default: the new model's ``eval_batch_size``, else 256).
        num_workers: DataLoader workers (default: the new model's).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: replace a space of that name written by another job.

    Returns:
        What the job did (:class:`StoreBackfill`), with the rows chosen this round (global store rows).
    """
    started = time.perf_counter()
    if policy not in POLICIES:
        raise ValueError(f"--policy {policy!r} is not known; choose one of {', '.join(POLICIES)}")
    _check_fraction(fraction, policy)
    if (policy == "list") != (list_path is not None):
        raise ValueError("--list FILE goes with --policy list (and only with it): the ids to backfill, first first")
    st = store if isinstance(store, Store) else Store(store)
    h, h_meta = load_h(h_checkpoint)
    images, split = _items_source(st, images, split)
    models, items = load_models([new_checkpoint], images, split, data_root)
    ((module, new_meta),) = models.values()
    _check_models(h_meta, new_meta)
    prov_dataset = (st.manifest.get("provenance") or {}).get("dataset")
    if isinstance(items, SplitItems) and prov_dataset and prov_dataset != items.view["dataset"]:
        raise ValueError(f"{st.path} holds items of dataset {prov_dataset!r}, but the new model reads "
                         f"{items.view['dataset']!r}; backfill with the new model of the store's own chain")
    _positions(st, items, 0, np.zeros(1, np.int64))  # the store's ids are the split's (checked again per row)
    from_space = check_space_name(from_space or ("fct+side" if h.has_side_info else "fct"))
    base, previous = check_from_space(st, from_space, h_meta, new_meta["digest"])
    info = st.space(from_space)
    if info.dim != int(module.embedding_dim):
        raise ValueError(f"space {from_space!r} holds {info.dim}-d rows but the new model embeds "
                         f"{module.embedding_dim}-d; pass the new model h was trained toward")
    k = previous + 1
    try:
        out_space = check_space_name(out_space or f"{base}-bf{k}")
    except StoreError as err:
        raise ValueError(f"--out_space: {err}") from err
    if out_space in (from_space, base, f"{base}-uncertainty", "old", "side_info"):
        raise ValueError(f"--out_space {out_space} would replace an input; the input space is never modified: "
                         f"choose another name (default {base}-bf{k})")

    source = read_source(st, from_space)
    n = st.rows
    what: dict[str, Any] = {"policy": policy, "fraction": fraction}
    if policy == "list":
        order, what["list"] = list_rows(st, list_path)
        target = (backfill_count(fraction, n) if fraction is not None
                  else int(np.count_nonzero(source)) + int(np.count_nonzero(source[order] == 0)))
    else:
        uncertainty, what["uncertainty"] = (uncertainty_of(st, base, h, h_meta, 65536)
                                            if policy in UNCERTAINTY_POLICIES else (None, None))
        if policy == "random":
            what["seed"] = int(seed)
        order = backfill_order(policy, n, seed, uncertainty)
        target = backfill_count(fraction, n)
    done = int(np.count_nonzero(source))
    if target <= done:
        raise ValueError(f"--fraction {fraction} means {target} of the {n} rows backfilled, but {done} already are "
                         f"(space {from_space!r}, rounds 1 to {previous}); pass a fraction above {done / n:.4g}"
                         if fraction is not None else
                         f"every id of --list {list_path} is backfilled already in space {from_space!r}")
    chosen = choose_rows(order, source, target)
    new_source = source.copy()
    new_source[chosen] = k

    spec = SpaceSpec(
        role="backfill", dim=info.dim, dtype=info.dtype, checkpoint_digest=h_meta["digest"],
        normalized=info.normalized and bool(getattr(getattr(module, "net", None), "normalize", False)),
        columns={SOURCE: "int16"},
        provenance={"command": "fct-backfill", "base": base, "input": from_space,
                    "inputs": {from_space: st.digest(from_space)}, "round": k, **what,
                    "transformation": h_meta["digest"], "new_digest": new_meta["digest"],
                    "dataset": new_meta.get("dataset"), "source": items.source, "rows": len(chosen),
                    "backfilled": int(np.count_nonzero(new_source)),
                    "chosen_sha256": "sha256:" + hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest(),
                    "source_codes": {"0": f"transformation {h_meta['digest']}",
                                     f"1-{k}": f"new {new_meta['digest']} (the backfill round)"}})
    part = job_part(shard)
    mine = st.shards_for(*part)
    dev = resolve_device(device)
    module = module.to(dev).eval()
    dataset = items.dataset(st)
    bs = batch_size or items.settings.get("eval_batch_size") or 256
    workers = num_workers if num_workers is not None else items.settings.get("num_workers") or 0
    embedded = 0
    with SpaceWriter(st, out_space, spec, mine, overwrite) as writer:
        log.info("fct-backfill: round %d of %s on %s: %d rows chosen by %s (%d of %d backfilled after it); job %d of "
                 "%d: %d shards to write", k, from_space, st.path, len(chosen), policy, np.count_nonzero(new_source),
                 n, *part, len(writer.pending))
        for i in list(writer.pending):
            sh = st.shard(i)
            local = chosen[(chosen >= sh.start) & (chosen < sh.stop)] - sh.start

            def produce(i: int = i, local: np.ndarray = local, sh: Any = sh) -> tuple[np.ndarray, dict]:
                data = _whole(st, from_space, i).copy()
                data[local] = _embed_rows(module, dataset, _positions(st, items, i, local), bs, workers, dev)
                return data, {SOURCE: new_source[sh.start:sh.stop]}

            if writer.write_shard(i, produce):
                embedded += len(local)
        written = list(writer.written)
    published = publish([writer], part)
    seconds = time.perf_counter() - started
    log.info("fct-backfill: %d rows embedded in %.1f s, %d shards written%s", embedded, seconds, len(written),
             "; space published" if published else "")
    return StoreBackfill(st.path, out_space, from_space, k, policy, chosen, int(np.count_nonzero(new_source)), mine,
                         written, embedded, seconds, published)


__all__ = ["StoreBackfill", "backfill_order", "backfill_store", "check_from_space", "choose_rows", "list_rows",
           "uncertainty_of"]
