"""``fct-eval`` on embedding stores: every case and backfilling curve from stored vectors, exact or through a FAISS
index, so a user sees what their ANN index and float16 storage cost.

A case ``<query space>/<gallery space>`` (from the registry, :mod:`fct_lightning.chain`, or given as store spaces
with ``spaces=``) reads its queries from the query store's space and its gallery from the gallery store's. When both
stores hold the same items in the same order (one store, or a store and its transformed copy) every query is
ranked leave-one-out (it never retrieves its own row); otherwise the query store is a separate query set. Labels
come from the stores' meta; float16 spaces are read as float32.

Exact metrics (top-1, top-5, full-ranking mAP, mAP@R) are :func:`~fct_lightning.retrieval.evaluate`'s. Through an
index, ``index/top1``, ``index/top5`` and ``index/map@r`` sit beside them: they need only each query's first ``k``
hits (``k`` = the largest class, so mAP@R is complete; a smaller ``k`` makes it a lower bound). Full-ranking mAP needs
the rank of every relevant item, which an index does not return, so it is exact only. The index is

* a FAISS factory string (``index="IVF64,Flat"``): built in memory on each case's gallery
  (:func:`~fct_lightning.retrieval.ann.evaluate_index`; ``"Flat"`` gives the exact numbers), and rebuilt for every
  point of every backfilling curve (the mixed gallery changes per point: about points x (seeds + other policies)
  builds and searches, tens of minutes for a 10k-row gallery on a 2-core CPU; docs/commands.md has the numbers);
* or an index folder built by ``fct-index`` (``index_path=``): used for the cases whose gallery is the space it was
  built on, refused when that space of the gallery store was rewritten since (:func:`fct_lightning.index.check_store`).
  It describes one fixed gallery, so backfilling curves stay exact with it.

Backfilling curves (FastFill): for each backfill space of the registry the gallery store has (``fct+side``,
``fct``), the gallery at fraction ``f`` holds the store's ``new`` vectors for the first ``f`` of the policy's order
and the stored transformed ones for the rest, which is what :func:`fct_lightning.backfill.backfill_curves` computes
from arrays; queries are the query store's ``new`` space. The ``uncertainty`` order reads fct-transform's
``<space>-uncertainty`` space (or an ``uncertainty`` row column of the space).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fct_lightning import chain
from fct_lightning.backfill import (
    BackfillContext,
    auc_mean,
    auc_trapz,
    backfill_count,
    backfill_curves,
    backfill_masks,
    check_order,
    get_policy,
    usable_policies,
)
from fct_lightning.index import check_store, load_index, search_arrays, set_nprobe
from fct_lightning.retrieval import summarize
from fct_lightning.retrieval.ann import (
    default_k,
    evaluate_index,
    metrics_from_hits,
    parse_search_parameters,
    set_search_parameters,
)
from fct_lightning.retrieval.compat import flips, top1_correct
from fct_lightning.retrieval.evaluate import evaluate_queries
from fct_lightning.retrieval.neighbors import prepare
from fct_lightning.store import Store, open_store

log = logging.getLogger(__name__)

INDEX_METRICS = ("top1", "top5", "map@r")
"""The metrics an index gives (from each query's top-k hits), logged as ``index/<metric>``."""
EXACT_ONLY = ("map",)
"""Full-ranking mAP: it needs the rank of every relevant item, which only the exact search has (no ``index/map``)."""
REFERENCE_CASE = "old/old"
PAIRING = ("auto", "leave_one_out", "separate")


@dataclass(frozen=True)
class IndexSpec:
    """How the index metrics are computed: a FAISS ``factory`` string or an fct-index folder ``path`` (one of them).

    Attributes:
        factory: e.g. ``"Flat"``, ``"IVF64,Flat"``, ``"HNSW32"``; built in memory for each gallery.
        path: an index folder written by ``fct-index`` on the gallery store.
        nprobe: inverted lists visited per query (IVF indexes); None keeps the index's own (FAISS's 1).
        k: hits per query; None = the largest class (less the query itself), which makes mAP@R complete.
        train_rows: training sample of a factory index that needs training (None = the whole gallery).
        search_params: more FAISS search-time parameters, ``"efSearch=128"`` (HNSW), ... (checked at once).
    """

    factory: str | None = None
    path: str | Path | None = None
    nprobe: int | None = None
    k: int | None = None
    train_rows: int | None = None
    search_params: str | None = None

    def __post_init__(self) -> None:
        if (self.factory is None) == (self.path is None):
            raise ValueError("give --index FACTORY or --index_path INDEX (one of them) for the index metrics")
        for name in ("nprobe", "k", "train_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{'index_k' if name == 'k' else name} {value!r} must be a positive integer")
        if self.search_params is not None:
            parse_search_parameters(self.search_params)  # a typo is an error before any work

    def describe(self) -> dict[str, Any]:
        """What the results' ``meta.index`` records."""
        return {"factory": self.factory, "path": None if self.path is None else str(self.path),
                "nprobe": self.nprobe, "k": self.k, "train_rows": self.train_rows, "search_params": self.search_params,
                "metrics": [f"index/{m}" for m in INDEX_METRICS],
                "note": "index/ metrics come from each query's top-k hits through the index; full-ranking mAP needs "
                        "every relevant item's rank and is computed by exact search only"}


# ----------------------------------------------------------------------------- reading stores
def read_space(store: Store, space: str, what: str) -> np.ndarray:
    """The whole ``space`` of ``store`` as one float32 ``[rows, dim]`` array (float16 shards converted)."""
    if space not in store.spaces:
        raise ValueError(f"{what} needs space {space!r}, which the store {store.path} does not have (it has "
                         f"{sorted(store.spaces) or 'none'}); write it (fct-embed, fct-transform, fct-store import) "
                         "or choose other --cases / --space")
    return np.concatenate([np.asarray(store.array(space, i), dtype=np.float32) for i in range(len(store.shards))])


def read_labels(store: Store, what: str) -> np.ndarray:
    """The int64 labels of every item of ``store``; an error when the store has none."""
    parts = [store.labels(i) for i in range(len(store.shards))]
    if any(p is None for p in parts):
        raise ValueError(f"the {what} {store.path} has no labels; retrieval metrics need one class label per item "
                         "(fct-store import --labels, or fct-embed of a labelled dataset)")
    return np.concatenate(parts).astype(np.int64)


def same_items(a: Store, b: Store) -> bool:
    """Whether two stores hold the same items (ids) in the same order (shard layouts may differ)."""
    if a.path.resolve() == b.path.resolve():
        return True
    if a.rows != b.rows:
        return False
    ids_a = [x for i in range(len(a.shards)) for x in a.ids(i)]
    return ids_a == [x for i in range(len(b.shards)) for x in b.ids(i)]


def leave_one_out(query: Store, gallery: Store, pairing: str) -> bool:
    """Whether queries are ranked leave-one-out: ``auto`` when the stores hold the same items in the same order;
    ``leave_one_out`` requires that; ``separate`` never."""
    if pairing not in PAIRING:
        raise ValueError(f"--pairing {pairing!r} is not known; choose from {list(PAIRING)}")
    if pairing == "separate":
        return False
    same = same_items(query, gallery)
    if pairing == "leave_one_out" and not same:
        raise ValueError(f"--pairing leave_one_out needs the query store {query.path} and the gallery store "
                         f"{gallery.path} to hold the same items in the same order ({query.rows} and {gallery.rows} "
                         "rows, ids differ); use --pairing separate for a separate query set")
    return same


# ----------------------------------------------------------------------------- cases
def case_spaces(cases: Sequence[str] | None, spaces: Sequence[str], query: Store,
                gallery: Store) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """``({case: (query space, gallery space)}, {case: why missing})``.

    Named ``cases`` (registry names) and ``spaces`` (``QUERY_SPACE/GALLERY_SPACE`` of the stores, e.g.
    ``new/fct+side-bf1``) must exist in the stores; with neither, the registry's default cases are taken and those
    whose spaces the stores lack are listed as missing.
    """
    out: dict[str, tuple[str, str]] = {}
    missing: dict[str, str] = {}
    for pair in spaces:
        q, sep, g = pair.partition("/")
        if not sep or not q or not g or "/" in g:
            raise ValueError(f"--space {pair!r} must be QUERY_SPACE/GALLERY_SPACE, e.g. new/fct+side-bf1")
        out[pair] = (q, g)
    named = cases is not None
    for name in (cases if named else (() if spaces else chain.default_cases())):
        c = chain.case(name)  # an unknown name: an error naming the known ones
        out[name] = (c.query, c.gallery)
    for name, (q, g) in list(out.items()):
        lacking = [f"the {what} store {st.path} has no space {s!r}" for what, st, s in
                   (("query", query, q), ("gallery", gallery, g)) if s not in st.spaces]
        if lacking and not named and name not in spaces:
            missing[name] = "; ".join(lacking)
            del out[name]
        elif lacking:
            have = f"query store: {sorted(query.spaces)}, gallery store: {sorted(gallery.spaces)}"
            raise ValueError(f"case {name}: {'; '.join(lacking)} ({have}); write it first or choose other --cases / "
                             "--space")
    if not out:
        raise ValueError(f"no case can be evaluated on the stores {query.path} and {gallery.path}: {missing}; name "
                         "the spaces to compare with --space QUERY_SPACE/GALLERY_SPACE")
    return out, missing


def check_models(cases: dict[str, tuple[str, str]], query: Store, gallery: Store) -> None:
    """Refuse pairs of spaces whose recorded checkpoints do not belong together.

    A space of the same name in both stores (``new`` of the queries and of the gallery) must come from the same
    checkpoint, and a transformed gallery (its provenance's ``new_digest``) must map into the space of the new model
    that embedded the queries; else a cross-model number would compare models never trained together.
    """
    problems = []
    for name, (q, g) in cases.items():
        qi, gi = query.space(q), gallery.space(g)
        if q == g and qi.checkpoint_digest and gi.checkpoint_digest and qi.checkpoint_digest != gi.checkpoint_digest:
            problems.append(f"case {name}: space {q!r} is from checkpoint {qi.checkpoint_digest} in {query.path} but "
                            f"{gi.checkpoint_digest} in {gallery.path}")
        want = (gi.provenance or {}).get("new_digest")
        if q == "new" and want and qi.checkpoint_digest and want != qi.checkpoint_digest:
            problems.append(f"case {name}: {gallery.path}'s {g!r} was transformed for the new model {want}, but the "
                            f"queries' 'new' space is from {qi.checkpoint_digest}")
    if problems:
        raise ValueError("the stores' spaces do not belong together: " + "; ".join(dict.fromkeys(problems)) +
                         ". Re-embed or re-transform with the checkpoints of one chain")


def _check_dims(name: str, q: np.ndarray, g: np.ndarray, spaces: tuple[str, str]) -> None:
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"case {name}: the query space {spaces[0]!r} is {q.shape[1]}-d but the gallery space "
                         f"{spaces[1]!r} is {g.shape[1]}-d; a case compares embeddings of one space (choose other "
                         "--cases / --space)")


# ----------------------------------------------------------------------------- index metrics
def _stored_index(spec: IndexSpec, gallery: Store) -> tuple[Any, dict[str, Any]]:
    """The fct-index folder's FAISS index and record, refused when built on another version of the gallery."""
    index, record = load_index(spec.path)
    check_store(record, gallery, spec.path)
    if spec.nprobe is not None:
        set_nprobe(index, spec.nprobe)
    if spec.search_params:
        set_search_parameters(index, spec.search_params)
    return index, record


def index_file_metrics(index: Any, record: dict[str, Any], query: Tensor, query_labels: Tensor,
                       gallery_labels: Tensor, exclude_self: bool, distance: str, k: int | None) -> dict[str, float]:
    """top-1/top-5/mAP@R of ``query`` searched in a stored index of the gallery (FAISS ids = gallery rows).

    Cosine distance, or an inner-product index, needs a gallery that was stored L2-normalised (the index holds its
    rows as they are); the queries are normalised here for cosine.
    """
    if (distance == "cosine" or record.get("metric") == "ip") and not record.get("normalized"):
        raise ValueError(f"the index {record.get('space')!r} ({record.get('metric')}) holds rows not recorded as "
                         f"L2-normalised, so it cannot rank by {distance}: use --distance l2 with a metric l2 index, "
                         "or index a normalised space")
    k = default_k(gallery_labels, (1, 5), exclude_self) if k is None else k
    q = prepare(query, distance).cpu().numpy()
    dists, ids = search_arrays(index, q, min(int(index.ntotal), k + int(exclude_self)))
    dists = -dists if record.get("metric") == "ip" else dists  # nearer = smaller for the (distance, id) order
    self_index = torch.arange(len(q)) if exclude_self else None
    return metrics_from_hits(ids, dists, query_labels.cpu(), gallery_labels.cpu(), self_index=self_index, ks=(1, 5))


def factory_metrics(spec: IndexSpec, query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                    exclude_self: bool, distance: str) -> dict[str, float]:
    """top-1/top-5/mAP@R through an in-memory index ``spec.factory`` of ``gallery``."""
    return evaluate_index(query, query_labels, gallery, gallery_labels, spec.factory, k=spec.k, distance=distance,
                          exclude_self=exclude_self, nprobe=spec.nprobe, train_rows=spec.train_rows,
                          search_params=spec.search_params)


# ----------------------------------------------------------------------------- evaluation
def run_store_eval(query_store: str | Path, gallery_store: str | Path, cases: Sequence[str] | None = None,
                   spaces: Sequence[str] = (), distance: str = "l2", device: str | torch.device = "cpu",
                   index: IndexSpec | None = None, pairing: str = "auto") -> dict[str, Any]:
    """Evaluate cases on two stores (the same one for leave-one-out); see the module docstring.

    Returns fct-eval's results layout: ``{"cases": {case: {top1, top5, map, map@r[, index/top1, index/top5,
    index/map@r]}}, "missing": {case: why}, "meta": {...}[, "flips": {case: {neg_flip, pos_flip}}]}`` and, for the
    backfilling curves, private ``_``-keys the caller pops (:func:`run_store_backfill`).
    """
    query, gallery = open_store(query_store), open_store(gallery_store)
    loo = leave_one_out(query, gallery, pairing)
    pairs, missing = case_spaces(cases, spaces, query, gallery)
    check_models(pairs, query, gallery)
    dev = torch.device(device)
    ql = torch.from_numpy(read_labels(query, "query store")).to(dev)
    gl = torch.from_numpy(read_labels(gallery, "gallery store")).to(dev)
    if loo and not torch.equal(ql, gl):
        row = int((ql != gl).nonzero()[0])
        raise ValueError(f"the query store {query.path} and the gallery store {gallery.path} hold the same items but "
                         f"different labels (from row {row}: {int(ql[row])} vs {int(gl[row])}); fix one store's labels")
    stored = _stored_index(index, gallery) if index is not None and index.path is not None else None
    if stored is not None and stored[1]["space"] not in {g for _, g in pairs.values()}:
        raise ValueError(f"the index {index.path} was built on space {stored[1]['space']!r}, which is the gallery of "
                         f"none of the cases {sorted(pairs)}; evaluate a case with that gallery space")
    cache: dict[tuple[str, str], Tensor] = {}

    def vectors(which: str, space: str) -> Tensor:
        if (which, space) not in cache:
            st = query if which == "query" else gallery
            cache[which, space] = torch.from_numpy(read_space(st, space, f"the {which} side")).to(dev)
        return cache[which, space]

    results: dict[str, Any] = {"cases": {}, "missing": missing, "meta": {
        "dataset": gallery.manifest.get("provenance", {}).get("dataset"), "split": None, "distance": distance,
        "query_store": str(query.path), "gallery_store": str(gallery.path), "leave_one_out": loo,
        "n_items": gallery.rows,
        "spaces": {c: {"query": q, "gallery": g, "query_dtype": query.space(q).dtype,
                       "gallery_dtype": gallery.space(g).dtype} for c, (q, g) in pairs.items()},
        "checkpoints": {**{g: {"path": str(gallery.path), "digest": gallery.space(g).checkpoint_digest}
                           for _, g in pairs.values()},
                        **{q: {"path": str(query.path), "digest": query.space(q).checkpoint_digest}
                           for q, _ in pairs.values()}},
    }}
    if not loo:
        results["meta"]["n_queries"] = query.rows
    if index is not None:
        results["meta"]["index"] = index.describe()
        if stored is not None:
            results["meta"]["index"].update(space=stored[1]["space"], record_factory=stored[1]["factory"],
                                            metric=stored[1]["metric"])
    correct: dict[str, Tensor] = {}
    for name, (q, g) in pairs.items():
        qx, gx = vectors("query", q), vectors("gallery", g)
        _check_dims(name, qx, gx, (q, g))
        per_query = evaluate_queries(qx, ql, gx, gl, exclude_self=loo, distance=distance)
        metrics = summarize(per_query, (1, 5), map_at_r=True)
        correct[name] = top1_correct(per_query).cpu()
        if index is not None and index.factory is not None:
            got = factory_metrics(index, qx, ql, gx, gl, loo, distance)
        elif stored is not None and g == stored[1]["space"]:
            got = index_file_metrics(*stored, qx, ql, gl, loo, distance, index.k)
        else:
            got = {}
        metrics.update({f"index/{m}": v for m, v in got.items()})
        results["cases"][name] = metrics
        log.info("%s: exact top1=%.4f map=%.4f%s", name, metrics["top1"], metrics["map"],
                 f", index top1={got['top1']:.4f}" if got else "")
    reference = correct.get(REFERENCE_CASE)
    if reference is not None:
        results["flips"] = {c: dict(zip(("neg_flip", "pos_flip"), flips(reference, got), strict=True))
                            for c, got in correct.items() if c != REFERENCE_CASE}
    results.update(_stores=(query, gallery), _labels=(ql, gl), _leave_one_out=loo, _reference_correct=reference,
                   _device=dev)
    return results


def store_uncertainty(gallery: Store, space: str) -> np.ndarray | None:
    """FastFill's per-row log-variance for ``space``: fct-transform's ``<space>-uncertainty`` space (from the same
    h as ``space``), else an ``uncertainty`` row column of ``space``; None when there is neither."""
    info = gallery.space(space)
    unc = gallery.spaces.get(f"{space}-uncertainty")
    if unc is not None:
        if unc.dim != 1 or (unc.checkpoint_digest and info.checkpoint_digest
                            and unc.checkpoint_digest != info.checkpoint_digest):
            raise ValueError(f"{gallery.path}'s space {unc.name!r} is not the uncertainty of {space!r} (dim "
                             f"{unc.dim}, checkpoint {unc.checkpoint_digest} vs {info.checkpoint_digest}); "
                             f"re-run fct-transform to write both")
        return read_space(gallery, unc.name, "the uncertainty order")[:, 0]
    if "uncertainty" in info.columns:
        return np.concatenate([gallery.row_columns(space, i, ["uncertainty"]).column("uncertainty").to_numpy()
                               for i in range(len(gallery.shards))]).astype(np.float32)
    return None


def _orders(ctx: BackfillContext, policies: Sequence[str], seeds: Sequence[int]) -> list[list[Tensor]]:
    """Per policy, its orders (one per seed when stochastic), as :func:`backfill_curves` draws them."""
    out = []
    for name in policies:
        policy = get_policy(name)
        out.append([check_order(policy.order(ctx, int(s)), ctx.n, f"policy {name!r} order")
                    for s in (seeds if policy.stochastic else seeds[:1])])
    return out


def index_curves(spec: IndexSpec, ctx: BackfillContext, query: Tensor, query_labels: Tensor, policies: Sequence[str],
                 seeds: Sequence[int], points: int, exclude_self: bool, distance: str) -> dict[str, dict[str, Any]]:
    """Per policy, ``{"curves": {index/<metric>: [...]}, "auc_mean": ..., "auc_trapz": ...}``: each point searched
    through an index ``spec.factory`` built on that point's mixed gallery (random orders averaged over seeds)."""
    fractions = np.linspace(0.0, 1.0, int(points))
    counts = [backfill_count(float(f), ctx.n) for f in fractions]
    ends = {0: ctx.gallery_transformed, ctx.n: ctx.gallery_new}
    at_ends = {c: factory_metrics(spec, query, query_labels, g, ctx.labels, exclude_self, distance)
               for c, g in ends.items()}
    out = {}
    for name, orders in zip(policies, _orders(ctx, policies, seeds), strict=True):
        runs = []
        for order in orders:
            masks = backfill_masks(order.to(ctx.gallery_new.device), counts)
            runs.append([at_ends[c] if c in at_ends else factory_metrics(
                spec, query, query_labels, torch.where(m.unsqueeze(1), ctx.gallery_new, ctx.gallery_transformed),
                ctx.labels, exclude_self, distance) for c, m in zip(counts, masks, strict=True)])
        curves = {f"index/{m}": [float(np.mean([r[j][m] for r in runs])) for j in range(len(counts))]
                  for m in INDEX_METRICS}
        out[name] = {"curves": curves, "auc_mean": {k: auc_mean(v) for k, v in curves.items()},
                     "auc_trapz": {k: auc_trapz(fractions, v) for k, v in curves.items()}}
    return out


def run_store_backfill(results: dict[str, Any], policies: Sequence[str], points: int, seeds: int, distance: str,
                       index: IndexSpec | None = None) -> dict[str, Any]:
    """Backfilling curves on the stores of :func:`run_store_eval`'s ``results`` (the ``"backfill"`` entry).

    One curve per policy and backfill space of the registry (``fct+side``, ``fct``) that the gallery store has;
    the new-model rows come from its ``new`` space, the queries from the query store's ``new``. With a factory
    ``index``, each curve also gets ``index/<metric>`` points and AUCs (an index rebuilt per point).
    Keys: ``"<space> <policy>"``, as fct-eval's curves from checkpoints.
    """
    query, gallery = results["_stores"]
    ql, gl = results["_labels"]
    loo, dev = results["_leave_one_out"], results["_device"]
    targets = [s for s in chain.backfill_sources() if s in gallery.spaces]
    if not targets:
        raise ValueError(f"backfilling curves need a transformed gallery space ({', '.join(chain.backfill_sources())}) "
                         f"in {gallery.path} (it has {sorted(gallery.spaces)}); write it with fct-transform")
    new = torch.from_numpy(read_space(gallery, "new", "backfilling (the gallery items' new-model rows)")).to(dev)
    # leave-one-out: the queries are the gallery items' own new rows (the same items in both stores)
    q_new = new if loo else torch.from_numpy(read_space(query, "new", "backfilling (the new model's queries)")).to(dev)
    out: dict[str, Any] = {}
    for space in targets:
        transformed = torch.from_numpy(read_space(gallery, space, "backfilling")).to(dev)
        if transformed.shape != new.shape:
            raise ValueError(f"backfilling {space!r}: {gallery.path}'s {space!r} is {list(transformed.shape)} but its "
                             f"'new' is {list(new.shape)}; the transformed gallery must be in the new model's space")
        unc = store_uncertainty(gallery, space)
        usable, skipped = usable_policies(policies, unc is not None)
        if skipped:
            log.warning("backfill: %s has no %s-uncertainty space (fct-transform writes it for a FastFill h); "
                        "skipping the %s policies for %s", gallery.path, space, "/".join(skipped), space)
        if not usable:
            continue
        ctx = BackfillContext(transformed, new, gl, None if unc is None else torch.from_numpy(unc).to(dev))
        query_kw = {} if loo else {"query_new": q_new, "query_labels": ql}
        curves = backfill_curves(ctx, usable, seeds=tuple(range(seeds)), points=points, distance=distance,
                                 exclude_self=loo, reference_correct=results.get("_reference_correct"), **query_kw)
        if index is not None and index.factory is not None:
            through = index_curves(index, ctx, q_new, gl if loo else ql, usable, tuple(range(seeds)), points, loo,
                                   distance)
            for name, extra in through.items():
                for key in ("curves", "auc_mean", "auc_trapz"):
                    curves[name][key].update(extra[key])
        info = gallery.space(space)
        out.update({f"{space} {policy}": dict(curve, store=str(gallery.path), space=space,
                                              digest=info.checkpoint_digest)
                    for policy, curve in curves.items()})
    if not out:
        raise ValueError(f"no backfilling curve could be computed on {gallery.path}: the policies {list(policies)} "
                         "need an uncertainty space it lacks; add random, or write it with fct-transform and a "
                         "FastFill h")
    return out

