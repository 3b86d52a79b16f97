"""``fct-eval``: evaluate every compatibility case whose checkpoints exist, on one evaluation split.

Each *space* is one way to embed an image (``old``, ``new``, ``side``, ``bct``, ``fct`` = h(old),
``fct+side`` = h(old, side)); each *case* is ``<query space>/<gallery space>`` searched leave-one-out on the
evaluation split, or from a query split into a gallery split (``--query_split``, ``--gallery_split``).
Images are decoded and embedded once for all spaces (GPU when there is one).
Results JSON: ``{"cases": {case: {top1, top5, map, "map@r"}}, "missing": {case: why}, "meta": {...},
"flips": {case: {"neg_flip", "pos_flip"}}}``: flips are the shares of queries whose top-1 was right with ``old/old``
and is wrong in the case (negative), or the converse (positive); present when ``old/old`` is evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fct_lightning import chain
from fct_lightning.backfill import (
    BackfillContext,
    backfill_curves,
    embed_for_backfill,
    transform_features,
    usable_policies,
)
from fct_lightning.data import DATAMODULES
from fct_lightning.devices import resolve_device
from fct_lightning.retrieval import summarize
from fct_lightning.retrieval.compat import flips, top1_correct
from fct_lightning.retrieval.evaluate import evaluate_queries
from fct_lightning.runs import chain_data_settings, stage_dir
from fct_lightning.stages.base import serve_input
from fct_lightning.stages.checkpoints import CheckpointError, check_class_names
from fct_lightning.stages.loading import load_stage

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "map", "map@r")
REFERENCE_CASE = "old/old"
"""The system before the update, against which negative and positive flips are counted."""


def load_spaces(artifacts: Path, dataset: str, spaces: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Load the embedding function of each space whose checkpoint exists; return ``(embedders, missing)``."""
    embedders, missing = {}, {}
    for space in sorted(spaces):
        variant, how = chain.space_source(space)
        path = stage_dir(artifacts, dataset, variant.name) / "best.ckpt"
        if not path.is_file():
            missing[space] = f"no checkpoint {path}"
            continue
        module, meta = load_stage(path, variant.name, (variant.stage,), dataset)
        if not variant.matches(module.hparams):
            raise CheckpointError(f"{path} is not a {variant.name} model (its options "
                                  f"{ {k: module.hparams.get(k) for k in variant.options} } are not "
                                  f"{dict(variant.options)}); re-train it with fct-fit --stage {variant.name}")
        embedders[space] = (module, module.gallery_embed if how.embed == "gallery" else module.query_embed, meta)
    return embedders, missing


def stale_inputs(meta: dict[str, Any], loaded: dict[str, dict[str, Any]]) -> list[str]:
    """Where a checkpoint was trained with other upstream files than the ones in use now.

    Args:
        meta: The checkpoint's metadata (:func:`~fct_lightning.checkpoints.load_stage`): its ``path`` and the
            ``<role>_digest`` of each upstream checkpoint it was trained with.
        loaded: By role (``old``, ``new``, ``side_info``), the metadata (``path``, ``digest``) of the upstream
            checkpoint in use now.

    Returns:
        One sentence per role whose digests differ (empty when the checkpoint belongs with them).
    """
    problems = []
    for role, current in loaded.items():
        want = meta.get(f"{role}_digest")
        if want and current and current.get("digest") and current["digest"] != want:
            problems.append(f"{meta['path']} was trained with the {role} checkpoint {want}, but {current['path']} "
                            f"is now {current['digest']}")
    return problems


def refuse_stale(problems: list[str]) -> None:
    """Raise :class:`CheckpointError` naming every stale checkpoint, if there is any."""
    if problems:
        raise CheckpointError(
            "the checkpoints of this chain do not belong together: " + "; ".join(problems) + ". A stage was "
            "re-trained after the stages built on it, so its cross-model numbers would compare embeddings of models "
            "that were never trained together. Re-train the stages named first (make re-runs them when an upstream "
            "checkpoint is newer), or restore the upstream checkpoint they were trained with.")


def check_chain(embedders: dict[str, Any]) -> None:
    """Refuse a chain whose checkpoints do not belong together.

    The transformations and BCT record the content digest of each frozen model they were trained with. When
    the ``old`` or ``new`` checkpoint on disk is another file (a stage re-trained after the stages built on
    it), cross-model cases would compare embeddings of models that were never trained together, and e.g.
    ``fct+side/old`` would pair queries of one new model with a gallery mapped into another's space.
    """
    problems = []
    by_variant = {chain.space_source(space)[0].name: e for space, e in embedders.items()}
    for space, (_, _, meta) in embedders.items():
        variant = chain.space_source(space)[0]
        loaded = {role: by_variant[role][2] for role in variant.upstream if role in by_variant}
        problems += stale_inputs(meta, loaded)
    refuse_stale(problems)


def _identity(x: Tensor) -> Tensor:
    return x


def _frozen_parts(space: str, module: Any, meta: dict[str, Any]) -> tuple[list[tuple[str | None, Any]], Any]:
    """``([(checkpoint digest, embedding function)], combine)``: the image models a space runs, and the function that
    makes the space's embedding of their features. The digest names the checkpoint file's content, so two spaces that
    load the same file (the old model of ``old``, ``fct`` and ``fct+side``; the new model of ``new`` and ``B``) share
    its features; a digest of None runs its function alone.

    A stage built on frozen models (``frozen_models`` and ``transform``) embeds a ``gallery`` space as
    ``transform(old, side)``, and a ``query`` space as its query-side map of the new model's features
    (``backward_embed``, the orthogonal stage's B: its ``query_embed`` is B(new(x))); a stage without that map runs
    its ``query_embed`` on the images.
    """
    embed = chain.space_source(space)[1].embed
    if hasattr(module, "frozen_models") and hasattr(module, "transform"):
        frozen = module.frozen_models()
        if embed == "gallery":  # h's inputs, in transform()'s order
            return [frozen[role] for role in ("old", "side") if role in frozen], module.transform
        if hasattr(module, "backward_embed"):
            return [frozen["new"]], module.backward_embed
        return [(None, module.query_embed)], _identity
    if embed == "gallery":
        return [(None, module.gallery_embed)], _identity
    return [(meta.get("digest"), module.query_embed)], _identity


@torch.no_grad()
def embed_split(loader: Any, embedders: dict[str, Any],
                device: torch.device) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """Embed every item of ``loader`` in every space, in item order.

    Every image model runs once per batch, however many spaces use it; ``fct`` and ``fct+side`` apply h to
    those features (as a deployed system transforms its stored gallery), and a query space of a stage on frozen
    models its query-side map to the new model's (``B``: B(new(x))); see :func:`_frozen_parts`.

    Returns:
        ``({space: [N, d]}, labels [N], {checkpoint digest: [N, d]})``: the last holds each image model's
        features, which the backfilling curves reuse.
    """
    out: dict[str, list[Tensor]] = {s: [] for s in embedders}
    feats: dict[str, list[Tensor]] = {}
    labels, index = [], []
    for images, y, idx in loader:
        images = images.to(device, non_blocking=True)
        batch: dict[str, Tensor] = {}
        for space, (module, _, meta) in embedders.items():
            got = []
            parts, combine = _frozen_parts(space, module, meta)
            for digest, fn in parts:
                if digest is None:
                    got.append(fn(images).float())
                    continue
                if digest not in batch:
                    batch[digest] = fn(images).float()
                got.append(batch[digest])
            out[space].append(combine(*got).float())
        for digest, f in batch.items():
            feats.setdefault(digest, []).append(f)
        labels.append(y.to(device))
        index.append(idx.to(device))
    order = torch.argsort(torch.cat(index))
    return ({s: torch.cat(v)[order] for s, v in out.items()}, torch.cat(labels)[order],
            {d: torch.cat(v)[order] for d, v in feats.items()})


def run_eval(
    dataset: str,
    artifacts: str | Path = "artifacts",
    cases: tuple[str, ...] | None = None,
    split: str | None = None,
    distance: str = "l2",
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    query_split: str | None = None,
    gallery_split: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``cases`` on ``dataset``; see the module docstring for the result layout.

    By default query set = gallery set = the evaluation split (``split``), leave-one-out. With ``query_split``
    and ``gallery_split`` (two different splits, e.g. the ``query/`` and ``gallery/`` folders of a ``folder``
    dataset), the query spaces embed the query split and the gallery spaces the gallery split, and every query
    is ranked against the whole gallery.
    """
    cases = chain.default_cases() if cases is None else cases
    case_spaces = {c: (chain.case(c).query, chain.case(c).gallery) for c in cases}  # unknown names: an error
    if (query_split is None) != (gallery_split is None):
        raise ValueError("give both --query_split and --gallery_split (or neither, for leave-one-out on --split)")
    separate = query_split is not None and query_split != gallery_split
    if query_split is not None and split is not None:
        raise ValueError("--split is the leave-one-out split; with --query_split/--gallery_split leave it out")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1 (images per evaluation batch)")
    artifacts = Path(artifacts)
    dev = resolve_device(device)
    spaces = {s for c in cases for s in case_spaces[c]}
    embedders, missing_spaces = load_spaces(artifacts, dataset, spaces)
    check_chain(embedders)
    for module, _, _ in embedders.values():
        module.to(dev).eval()
    split = gallery_split if query_split is not None else split
    kwargs = chain_data_settings(artifacts, dataset, ["new", "old", *chain.VARIANTS])
    kwargs.update({k: v for k, v in (("root", data_root), ("eval_split", split), ("eval_batch_size", batch_size)) if v})
    dm = DATAMODULES[dataset](**kwargs)
    for module, _, meta in embedders.values():  # labels are class indices: the class list must be the one trained on
        check_class_names(meta, meta["path"], meta["stage"], getattr(dm, "class_names", None))
        serve_input(module, dm)  # each image model reads the split as it was trained to (models.inputs)
    if separate and query_split not in dm.splits:
        raise ValueError(f"query_split={query_split!r} is not a split of {dataset}; allowed: {dm.splits}")

    def embed(split_name: str, roles: set[str]) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        used = {space: e for space, e in embedders.items() if space in roles}
        return embed_split(dm.eval_dataloader(split_name), used, dev) if used else ({}, None, {})

    # leave-one-out: every space on the one split; separate sets: query spaces on the query split only
    embs, labels, feats = embed(dm.eval_split, {case_spaces[c][1] for c in cases} if separate else spaces)
    q_embs, q_labels, _ = embed(query_split, {case_spaces[c][0] for c in cases}) if separate else (embs, labels, {})
    results: dict[str, Any] = {"cases": {}, "missing": {}, "meta": {
        "dataset": dataset, "split": dm.eval_split, "distance": distance,
        "n_items": 0 if labels is None else len(labels),
        "checkpoints": {s: {"path": e[2]["path"], "digest": e[2]["digest"]} for s, e in embedders.items()},
    }}
    if separate:
        results["meta"].update(query_split=query_split, n_queries=0 if q_labels is None else len(q_labels))
    if getattr(dm, "eval_dir", None):  # image trees: which folder the split was read from (val/ or test/ ...)
        evaluation = getattr(dm, "default_eval_split", "test")  # CIFAR's evaluation split is "test"
        results["meta"]["split_folder"] = {"train": getattr(dm, "train_dir", "train"),
                                           evaluation: dm.eval_dir}.get(dm.eval_split, dm.eval_split)
    correct: dict[str, Tensor] = {}  # per case, whether each query's top-1 is right
    for case in cases:
        q, g = case_spaces[case]
        lacking = [missing_spaces[s] for s in (q, g) if s in missing_spaces]
        if lacking:
            results["missing"][case] = "; ".join(dict.fromkeys(lacking))
            continue
        per_query = evaluate_queries(q_embs[q], q_labels, embs[g], labels, exclude_self=not separate,
                                     distance=distance)
        results["cases"][case] = summarize(per_query, (1, 5), map_at_r=True)
        correct[case] = top1_correct(per_query).cpu()
    reference = correct.get(REFERENCE_CASE)
    if reference is not None:
        results["flips"] = {case: dict(zip(("neg_flip", "pos_flip"), flips(reference, got), strict=True))
                            for case, got in correct.items() if case != REFERENCE_CASE}
    queries = (q_embs["new"], q_labels, embedders["new"][2]["digest"]) if separate and "new" in q_embs else None
    results.update(_embeddings=(embs, labels), _features=feats, _datamodule=dm, _device=dev, _queries=queries,
                   _chain={role: embedders[role][2] for role in ("old", "new") if role in embedders},
                   _reference_correct=reference)
    return results


def run_backfill(
    artifacts: Path, dm: Any, dev: torch.device, policies: list[str], points: int, seeds: int, distance: str,
    features: dict[str, Tensor] | None = None, labels: Tensor | None = None,
    queries: tuple[Tensor, Tensor, str] | None = None, chain_models: dict[str, dict[str, Any]] | None = None,
    reference_correct: Tensor | None = None, galleries: dict[str, tuple[BackfillContext, list[str]]] | None = None,
) -> dict[str, Any]:
    """Backfilling curves for each transformation variant found (FastFill's head preferred: it has uncertainty).

    ``features`` (checkpoint digest -> ``[N, d]``, from :func:`embed_split`) and ``labels``: the frozen models'
    features of the evaluation split; h is applied to them when they cover the variant's old, side-info and
    new models, and the split's images are read again only when they do not.
    ``queries``: ``(new-model embeddings, labels, new checkpoint digest)`` of a separate query split; None =
    leave-one-out queries from the gallery split itself.
    ``chain_models``: metadata of the ``old``/``new`` checkpoints the cases used, by role; a transformation trained with
    other ones is refused (:func:`stale_inputs`), as is one whose frozen models' files changed since training.
    ``reference_correct``: per query, whether ``old/old``'s top-1 is right (the same queries as the curves'); each
    curve then also has its negative and positive flips per backfilling point (``"flips"``).
    ``galleries``: a dict that receives, per gallery space with curves, ``(its BackfillContext, the policies used)``
    (fct-eval draws a partly backfilled gallery in its retrieval grid from them).
    Keys of the result are ``"<space> <policy>"``, e.g. ``"fct+side uncertainty"``.
    """
    features = features or {}

    dataset = dm.name
    out: dict[str, Any] = {}
    for space, variants in chain.backfill_sources().items():
        folders = [v.name for v in variants]
        path = next((stage_dir(artifacts, dataset, f) / "best.ckpt" for f in folders
                     if (stage_dir(artifacts, dataset, f) / "best.ckpt").is_file()), None)
        if path is None:
            log.warning("backfill: no %s checkpoint under %s; skipping %s", " or ".join(folders), artifacts, space)
            continue
        # h is only meaningful with the frozen models it was trained with. The files it loads them from now were
        # compared with its training digests while loading (RetrievalStage.on_load_checkpoint); here they are
        # compared with the old/new checkpoints of the chain whose cases these curves sit next to
        module, meta = load_stage(path, path.parent.name, tuple({v.stage for v in variants}), dataset)
        check_class_names(meta, path, path.parent.name, getattr(dm, "class_names", None))
        used = dict(chain_models or {})  # the models the cases (and the separate queries) were embedded with
        if queries is not None and "new" not in used:
            used["new"] = {"path": "the separate queries' new model", "digest": queries[2]}
        problems = stale_inputs(meta, used)
        # a checkpoint written before the training digests were recorded is judged by the models it loads now
        digest = {role: d for role, (d, _) in module.frozen_models().items()}
        problems += [f"{path} loads the {role} checkpoint {digest[role]}, but {m.get('path')} is {m['digest']}"
                     for role, m in used.items() if role in digest and not meta.get(f"{role}_digest")
                     and m.get("digest") and m["digest"] != digest[role]]
        refuse_stale(list(dict.fromkeys(problems)))
        serve_input(module, dm)
        module.to(dev)
        usable, skipped = usable_policies(policies, bool(module.uncertainty))
        if skipped:
            log.warning("backfill: %s has no uncertainty head (train it with --model.uncertainty true); "
                        "skipping the %s policies for %s", path, "/".join(skipped), space)
        if not usable:
            continue
        # on `dev`: the curves evaluate the whole gallery once per point, policy and seed (on an H200, CIFAR-10's
        # evaluations took minutes on the host CPU)
        if labels is not None and all(d in features for d in digest.values()):
            side = features[digest["side"]] if "side" in digest else None
            emb = transform_features(module, features[digest["old"]], side, features[digest["new"]], labels)
        else:
            emb = embed_for_backfill(module, dm.eval_dataloader(dm.eval_split), dev)
        query: dict[str, Any] = {}
        if queries is not None:
            query = {"query_new": queries[0], "query_labels": queries[1], "exclude_self": False}
        ctx = BackfillContext.from_embeddings(emb)
        if galleries is not None:
            galleries[space] = (ctx, usable)
        curves = backfill_curves(ctx, usable, seeds=tuple(range(seeds)),
                                 points=points, distance=distance, reference_correct=reference_correct, **query)
        out.update({f"{space} {policy}": dict(curve, checkpoint=str(path), digest=meta["digest"],
                                              source=path.parent.name)
                    for policy, curve in curves.items()})
    return out


INDEX_METRICS = {"index/top1": "top-1 (index)", "index/top5": "top-5 (index)", "index/map@r": "mAP@R (index)"}
"""Metrics through a FAISS index (fct-eval on stores with ``--index``); full-ranking mAP has none (exact only)."""


def markdown_table(results: dict[str, Any]) -> str:
    """Rows = cases, columns = metrics (percent); missing cases listed with the reason.

    When some case (or curve) was also evaluated through an index, its ``index/`` metrics follow the exact ones
    (empty where a case was not searched through it), so the two are read side by side.
    """
    rows = [*results["cases"].values(), *(c["auc_mean"] for c in results.get("backfill", {}).values())]
    keys = METRICS + tuple(k for k in INDEX_METRICS if any(k in r for r in rows))
    head = ["top-1", "top-5", "mAP", "mAP@R"] + [INDEX_METRICS[k] for k in keys[len(METRICS):]]
    lines = ["| case | " + " | ".join(head) + " |", "|---|" + "---|" * len(keys)]

    def cells(m: dict[str, float]) -> str:
        return " | ".join(f"{100 * m[k]:.1f}" if k in m else "" for k in keys)

    for case, m in results["cases"].items():
        lines.append(f"| {case} | {cells(m)} |")
    for case, why in results["missing"].items():
        lines.append(f"| {case} | missing: {why} |" + " |" * (len(keys) - 1))
    for name, curve in results.get("backfill", {}).items():
        lines.append(f"| backfill {name} (AUC) | {cells(curve['auc_mean'])} |")
    if len(keys) > len(METRICS):
        lines.append("\nPercent; (index) = through the FAISS index, from each query's top-k hits; full-ranking mAP "
                     "needs every relevant item's rank and is exact only.")
    first = {name: c["first"] for name, c in results.get("backfill", {}).items() if "first" in c}
    if first:
        share = 100 * next(iter(first.values()))["fraction"]
        lines += ["", f"What each order backfills first (its first {share:g}%): h's squared error as a multiple of "
                  "the gallery's mean; misplaced = nearest to another class's new embeddings.", "",
                  "| backfill | error x mean | misplaced | misplaced, whole gallery |", "|---|---|---|---|"]
        lines += [f"| {name} | {f['error_ratio']:.2f} | {100 * f['misplaced']:.1f} | {100 * f['misplaced_all']:.1f} |"
                  for name, f in first.items()]
    return "\n".join(lines)
