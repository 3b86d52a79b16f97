"""The compatibility matrix of a chain of model versions, computed on a dataset's evaluation split.

``M[i][j]`` is a metric of version ``i``'s queries against the gallery whose items version ``j`` embedded, as the
system holds it when version ``i`` serves: moved into version ``i``'s space by the updates' transformations
(``i > j``), or as embedded (``i == j``, the diagonal: what re-embedding the gallery with version ``i`` gives). Three
ways to hold it, one matrix each:

* ``fct``: the updates applied in sequence, ``h_{i-1,i}( ... h_{j,j+1}(v_j(x), s(x)) ..., s(x))``, the side-info
  ``s(x)`` stored once at v1 (what a system that transforms at every update holds);
* ``direct``: ``h_{1,K}(v_1(x), s(x))`` where the plan trained it (entry ``[K][1]``), else as ``fct``;
* ``none``: the gallery left as embedded, ``v_j(x)`` (independently trained models; only where the dimensions agree).

Per entry: top-1, top-5, mAP, mAP@R (leave-one-out, exact), and negative / positive flips against the gallery's own
system ``v_j/v_j`` (queries it answered right at top-1 that version ``i`` now gets wrong, and the converse). AC and AM
(:mod:`fct_lightning.retrieval.compat`) summarise each matrix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fct_lightning import chain
from fct_lightning.data import DATAMODULES
from fct_lightning.devices import resolve_device
from fct_lightning.evaluation import refuse_stale
from fct_lightning.retrieval import summarize
from fct_lightning.retrieval.compat import ac, am, flips, top1_correct
from fct_lightning.retrieval.evaluate import evaluate_queries
from fct_lightning.runs import chain_data_settings, stage_dir
from fct_lightning.stages.base import serve_input
from fct_lightning.stages.checkpoints import check_class_names, file_digest
from fct_lightning.stages.loading import load_stage
from fct_lightning.versions.plan import VERSION_STAGES, Plan

#: metrics of every matrix entry
ENTRY_METRICS = ("top1", "top5", "map", "map@r", "neg_flip", "pos_flip")
#: the metrics AC and AM summarise (flips have no compatibility criterion)
SCORED_METRICS = ("top1", "top5", "map", "map@r")
KINDS = ("fct", "direct", "none")


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} {path} does not exist: train the plan first (fct-versions without --eval_only, "
                             "or make <dataset>-versions)")


def load_models(plan: Plan, dataset: str, version_ckpt: dict[str, Path], h_ckpt: dict[tuple[int, int], Path],
                side_ckpt: Path | None) -> tuple[list[Any], dict[tuple[int, int], Any], Any, dict[str, Any]]:
    """The version models, the updates' h (checked to stand on those very version files) and the side-info model.

    Returns ``(versions, {(i, j): h stage}, side-info stage or None, {name: checkpoint meta})``.
    """
    metas: dict[str, Any] = {}
    versions = []
    for v in plan.versions:
        path = version_ckpt[v.name]
        if not path.is_file():
            raise _missing(path, f"version {v.name}'s checkpoint")
        module, metas[v.name] = load_stage(path, v.name, VERSION_STAGES, dataset)
        versions.append(module)
    side = None
    if plan.uses_side_info:
        if side_ckpt is None or not side_ckpt.is_file():
            raise _missing(side_ckpt or Path("side_info/best.ckpt"), "the side-info checkpoint")
        side, metas["side_info"] = load_stage(side_ckpt, "side_info", ("side_info",), dataset)
    h_stage = chain.get(plan.transformation).stage
    hs: dict[tuple[int, int], Any] = {}
    problems = []
    for (i, j), path in h_ckpt.items():
        name = f"{plan.versions[i].name}-{plan.versions[j].name}"
        if not path.is_file():
            raise _missing(path, f"update {name}'s checkpoint")
        module, metas[name] = load_stage(path, name, (h_stage,), dataset)
        frozen = {role: digest for role, (digest, _) in module.frozen_models().items()}
        want = {"old": metas[plan.versions[i].name], "new": metas[plan.versions[j].name],
                **({"side": metas["side_info"]} if "side" in frozen else {})}
        problems += [f"{path} (update {name}) stands on the {role} checkpoint {frozen[role]}, but the plan's is "
                     f"{m['path']} ({m['digest']})" for role, m in want.items() if frozen.get(role) != m["digest"]]
        hs[(i, j)] = module
    refuse_stale(problems)
    return versions, hs, side, metas


@torch.no_grad()
def embed_versions(loader: Any, versions: list[Any], side: Any,
                   device: torch.device) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """Every version's embedding of every item of ``loader`` (one decode per image), the side-info features and
    the labels, in item order."""
    feats: list[list[Tensor]] = [[] for _ in versions]
    side_feats, labels, index = [], [], []
    for images, y, idx in loader:
        images = images.to(device, non_blocking=True)
        for k, module in enumerate(versions):
            feats[k].append(module.query_embed(images).float())
        if side is not None:
            side_feats.append(side.query_embed(images).float())
        labels.append(y.to(device))
        index.append(idx.to(device))
    order = torch.argsort(torch.cat(index))
    return ([torch.cat(f)[order] for f in feats], torch.cat(side_feats)[order] if side is not None else None,
            torch.cat(labels)[order])


@torch.no_grad()
def held_galleries(feats: list[Tensor], side: Tensor | None, hs: dict[tuple[int, int], Any],
                   kind: str) -> dict[tuple[int, int], Tensor]:
    """``{(i, j): gallery of version j as held when version i serves}`` for ``j <= i``, held the ``kind`` way;
    ``none`` leaves out pairs whose dimensions differ."""
    return {pair: gallery for pair, (_, gallery) in _held(feats, side, hs, kind).items()}


def _held(feats: list[Tensor], side: Tensor | None, hs: dict[tuple[int, int], Any],
          kind: str) -> dict[tuple[int, int], tuple[tuple[Any, ...], Tensor]]:
    """:func:`held_galleries` with, per gallery, a key naming how it was made: two kinds that hold a gallery the
    same way (the diagonal in every kind; ``direct`` equals ``fct`` except where a direct h exists) give it the
    same key, so its entry is evaluated once."""
    k = len(feats)
    out: dict[tuple[int, int], tuple[tuple[Any, ...], Tensor]] = {}
    for j in range(k):
        held = feats[j]
        out[(j, j)] = (("embedded", j), held)
        for i in range(j + 1, k):
            if kind == "none":
                if feats[j].shape[1] == feats[i].shape[1]:
                    out[(i, j)] = (("embedded", j), feats[j])
                continue
            held = hs[(i - 1, i)].transform(held, side)  # the sequence of updates, one after the other
            out[(i, j)] = ((("direct", j, i), hs[(j, i)].transform(feats[j], side))
                           if kind == "direct" and i - j > 1 and (j, i) in hs else (("sequence", j, i), held))
    return out


def matrices(feats: list[Tensor], side: Tensor | None, labels: Tensor, hs: dict[tuple[int, int], Any],
             distance: str = "l2") -> dict[str, dict[str, list[list[float | None]]]]:
    """``{kind: {metric: K x K}}`` (None above the diagonal and where a kind has no gallery); ``direct`` only when
    an update skips versions."""
    k = len(feats)
    kinds = [kind for kind in KINDS if kind != "direct" or any(j - i > 1 for i, j in hs)]
    out: dict[str, dict[str, list[list[float | None]]]] = {}
    diagonal: dict[int, Tensor] = {}  # per version, which queries v_j/v_j answers right
    done: dict[tuple[Any, ...], dict[str, float]] = {}  # (query version, how the gallery was held) -> entry
    for kind in kinds:
        m: dict[str, list[list[float | None]]] = {name: [[None] * k for _ in range(k)] for name in ENTRY_METRICS}
        held = _held(feats, side, hs, kind)
        for (i, j), (how, gallery) in sorted(held.items(), key=lambda p: (p[0][1], p[0][0])):
            if (i, *how) not in done:
                per = evaluate_queries(feats[i], labels, gallery, labels, exclude_self=True, distance=distance)
                got = summarize(per, (1, 5), map_at_r=True)
                correct = top1_correct(per).cpu()
                if i == j:
                    diagonal[j] = correct
                got["neg_flip"], got["pos_flip"] = flips(diagonal[j], correct)
                done[(i, *how)] = {name: float(got[name]) for name in ENTRY_METRICS}
            for name in ENTRY_METRICS:
                m[name][i][j] = done[(i, *how)][name]
        out[kind] = m
    return out


def scores(m: dict[str, list[list[float | None]]]) -> dict[str, dict[str, float | None]]:
    """AC and AM of each scored metric of one kind's matrices (None where the lower triangle is incomplete)."""
    out = {}
    for name in SCORED_METRICS:
        arr = np.array([[math.nan if v is None else v for v in row] for row in m[name]])
        low = arr[np.tril_indices(len(arr))]
        out[name] = ({"ac": ac(arr), "am": am(arr)} if np.isfinite(low).all() else {"ac": None, "am": None})
    return out


def evaluate_versions(plan: Plan, dataset: str, artifacts: str | Path, version_ckpt: dict[str, Path],
                      h_ckpt: dict[tuple[int, int], Path], data_root: str | None = None, device: str = "auto",
                      batch_size: int | None = None, distance: str = "l2") -> dict[str, Any]:
    """Embed the dataset's evaluation split with every version and compute the matrices; the results file's
    content (``{"versions", "updates", "matrices", "scores", "meta"}``)."""
    artifacts = Path(artifacts)
    side_ckpt = stage_dir(artifacts, dataset, "side_info") / "best.ckpt" if plan.uses_side_info else None
    versions, hs, side, metas = load_models(plan, dataset, version_ckpt, h_ckpt, side_ckpt)
    dev = resolve_device(device)
    for module in [*versions, *hs.values(), *([side] if side is not None else [])]:
        module.to(dev).eval()
    kwargs = chain_data_settings(artifacts, dataset, ["new", "old", *chain.VARIANTS])
    kwargs.update({k: v for k, v in (("root", data_root), ("eval_batch_size", batch_size)) if v})
    dm = DATAMODULES[dataset](**kwargs)
    for name, meta in metas.items():  # labels are class indices: the class list must be the one trained on
        check_class_names(meta, meta["path"], name, getattr(dm, "class_names", None))
    for module in [*versions, *hs.values(), *([side] if side is not None else [])]:
        serve_input(module, dm)  # each image model reads the split as it was trained to (models.inputs)
    feats, side_feats, labels = embed_versions(dm.eval_dataloader(dm.eval_split), versions, side, dev)
    found = matrices(feats, side_feats, labels, hs, distance)
    names = plan.names
    return {
        "versions": [{"name": v.name, "checkpoint": str(version_ckpt[v.name]), "digest": file_digest(version_ckpt[
            v.name]), "classes": len(getattr(versions[k], "classes", []) or []) or None,
            "source": f"chain {v.variant}" if v.variant else f"plan ({v.stage})"}
            for k, v in enumerate(plan.versions)],
        "updates": {f"{names[i]}->{names[j]}": {"checkpoint": str(p), "digest": file_digest(p)}
                    for (i, j), p in h_ckpt.items()},
        "matrices": found,
        "scores": {kind: scores(m) for kind, m in found.items()},
        "meta": {"dataset": dataset, "split": dm.eval_split, "n_items": len(labels), "distance": distance,
                 "transformation": plan.transformation, "plan": plan.source,
                 "side_info": str(side_ckpt) if side_ckpt else None},
    }
