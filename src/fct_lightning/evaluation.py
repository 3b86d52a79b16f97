"""``fct-eval``: evaluate every compatibility case whose checkpoints exist, on one evaluation split.

Each *space* is one way to embed an image (``old``, ``new``, ``side``, ``bct``, ``fct`` = h(old),
``fct+side`` = h(old, side)); each *case* is ``<query space>/<gallery space>`` searched leave-one-out on the
evaluation split, or from a query split into a gallery split (``--query_split``, ``--gallery_split``).
Images are decoded and embedded once for all spaces (GPU when there is one).
Results JSON: ``{"cases": {case: {top1, top5, map, "map@r"}}, "missing": {case: why}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from fct_lightning.checkpoints import CheckpointError, check_class_names, load_stage
from fct_lightning.data import DATAMODULES
from fct_lightning.retrieval import CASES, evaluate

log = logging.getLogger(__name__)

CASE_SPACES: dict[str, tuple[str, str]] = {
    "old/old": ("old", "old"),
    "new/new": ("new", "new"),
    "new/old": ("new", "old"),
    "bct/old": ("bct", "old"),
    "bct/bct": ("bct", "bct"),
    "fct/old": ("new", "fct"),
    "fct+side/old": ("new", "fct+side"),
    "side/side": ("side", "side"),
}
SPACE_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    # space: (artifact folder, accepted checkpoint stages)
    "old": ("old", ("old",)),
    "new": ("new", ("new",)),
    "side": ("side_info", ("side_info",)),
    "bct": ("bct", ("bct",)),
    "fct": ("transformation_noside", ("transformation",)),
    "fct+side": ("transformation", ("transformation",)),
}
DEFAULT_CASES = tuple(c for c in CASES if c != "side/side")
METRICS = ("top1", "top5", "map", "map@r")


def load_spaces(artifacts: Path, dataset: str, spaces: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Load the embedding function of each space whose checkpoint exists; return ``(embedders, missing)``."""
    embedders, missing = {}, {}
    for space in sorted(spaces):
        folder, stages = SPACE_SOURCES[space]
        path = artifacts / dataset / folder / "best.ckpt"
        if not path.is_file():
            missing[space] = f"no checkpoint {path}"
            continue
        module, meta = load_stage(path, folder, stages, dataset)
        if space in ("fct", "fct+side"):
            want = space == "fct+side"
            if module.use_side_info != want:
                raise CheckpointError(f"{path} has use_side_info={module.use_side_info}, expected {want} for {space}")
            embedders[space] = (module, module.gallery_embed, meta)
        else:
            embedders[space] = (module, module.query_embed, meta)
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
    for space, roles in (("fct+side", ("old", "new")), ("fct", ("old", "new")), ("bct", ("old",))):
        if space in embedders:
            loaded = {role: embedders[role][2] for role in roles if role in embedders}
            problems += stale_inputs(embedders[space][2], loaded)
    refuse_stale(problems)


def _frozen_parts(space: str, module: Any, meta: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """``(checkpoint digest, embedding function)`` of the image models a space runs; the digest names the
    checkpoint file's content, so two spaces that load the same file (the old model of ``old``, ``fct`` and
    ``fct+side``) share its embeddings."""
    if space in ("fct", "fct+side"):  # h's inputs, in the order transform() takes them
        frozen = module.frozen_models()
        return [frozen[role] for role in ("old", "side") if role in frozen]
    return [(meta.get("digest"), module.query_embed)]


@torch.no_grad()
def embed_split(loader: Any, embedders: dict[str, Any],
                device: torch.device) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """Embed every item of ``loader`` in every space, in item order.

    Every image model runs once per batch, however many spaces use it; ``fct`` and ``fct+side`` apply h to
    those features (as a deployed system transforms its stored gallery).

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
            for digest, fn in _frozen_parts(space, module, meta):
                if digest is None:
                    got.append(fn(images).float())
                    continue
                if digest not in batch:
                    batch[digest] = fn(images).float()
                got.append(batch[digest])
            emb = module.transform(*got) if space in ("fct", "fct+side") else got[0]
            out[space].append(emb.float())
        for digest, f in batch.items():
            feats.setdefault(digest, []).append(f)
        labels.append(y.to(device))
        index.append(idx.to(device))
    order = torch.argsort(torch.cat(index))
    return ({s: torch.cat(v)[order] for s, v in out.items()}, torch.cat(labels)[order],
            {d: torch.cat(v)[order] for d, v in feats.items()})


# what evaluation takes over from training's data settings: where the data is, which split and folders, the image
# size, and how fast to load (not the training batch, classes, views or augmentation)
EVAL_DATA_KEYS = ("root", "image_size", "eval_split", "eval_batch_size", "train_dir", "eval_dir", "num_workers")


def eval_data_settings(data: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation-relevant entries (:data:`EVAL_DATA_KEYS`, those set) of a stage's datamodule arguments."""
    return {k: data[k] for k in EVAL_DATA_KEYS if (data or {}).get(k) is not None}


def config_data_settings(cfg: Path) -> dict[str, Any]:
    """:func:`eval_data_settings` of the ``data`` section of a run's ``config.yaml``."""
    return eval_data_settings((yaml.safe_load(cfg.read_text()) or {}).get("data"))


def stage_data_config(artifacts: Path, dataset: str) -> dict[str, Any]:
    """The evaluation-relevant ``data`` settings (:data:`EVAL_DATA_KEYS`) of the first stage config found, so eval
    reads the same folders at the same image size as training (e.g. ``make folder EXTRA="--data.eval_dir test"``)."""
    for folder in ("new", "old", "transformation", "bct", "side_info", "transformation_noside"):
        cfg = artifacts / dataset / folder / "config.yaml"
        if cfg.is_file():
            return config_data_settings(cfg)
    return {}


def resolve_device(device: str) -> torch.device:
    """``--device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``, with a clear error."""
    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for a GPU, but CUDA is not available here; use --device cpu (or auto)")
    return dev


def run_eval(
    dataset: str,
    artifacts: str | Path = "artifacts",
    cases: tuple[str, ...] = DEFAULT_CASES,
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
    unknown = [c for c in cases if c not in CASE_SPACES]
    if unknown:
        raise ValueError(f"cases {unknown} are not known; choose from {list(CASE_SPACES)}")
    if (query_split is None) != (gallery_split is None):
        raise ValueError("give both --query_split and --gallery_split (or neither, for leave-one-out on --split)")
    separate = query_split is not None and query_split != gallery_split
    if query_split is not None and split is not None:
        raise ValueError("--split is the leave-one-out split; with --query_split/--gallery_split leave it out")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1 (images per evaluation batch)")
    artifacts = Path(artifacts)
    dev = resolve_device(device)
    spaces = {s for c in cases for s in CASE_SPACES[c]}
    embedders, missing_spaces = load_spaces(artifacts, dataset, spaces)
    check_chain(embedders)
    for module, _, _ in embedders.values():
        module.to(dev).eval()
    split = gallery_split if query_split is not None else split
    kwargs = stage_data_config(artifacts, dataset)
    kwargs.update({k: v for k, v in (("root", data_root), ("eval_split", split), ("eval_batch_size", batch_size)) if v})
    dm = DATAMODULES[dataset](**kwargs)
    for _, _, meta in embedders.values():  # labels are class indices: the class list must be the one trained on
        check_class_names(meta, meta["path"], meta["stage"], getattr(dm, "class_names", None))
    if separate and query_split not in dm.splits:
        raise ValueError(f"query_split={query_split!r} is not a split of {dataset}; allowed: {dm.splits}")

    def embed(split_name: str, roles: set[str]) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        used = {space: e for space, e in embedders.items() if space in roles}
        return embed_split(dm.eval_dataloader(split_name), used, dev) if used else ({}, None, {})

    # leave-one-out: every space on the one split; separate sets: query spaces on the query split only
    embs, labels, feats = embed(dm.eval_split, {CASE_SPACES[c][1] for c in cases} if separate else spaces)
    q_embs, q_labels, _ = embed(query_split, {CASE_SPACES[c][0] for c in cases}) if separate else (embs, labels, {})
    results: dict[str, Any] = {"cases": {}, "missing": {}, "meta": {
        "dataset": dataset, "split": dm.eval_split, "distance": distance, "n_items": 0 if labels is None else len(labels),
        "checkpoints": {s: {"path": e[2]["path"], "digest": e[2]["digest"]} for s, e in embedders.items()},
    }}
    if separate:
        results["meta"].update(query_split=query_split, n_queries=0 if q_labels is None else len(q_labels))
    if getattr(dm, "eval_dir", None):  # image trees: which folder the split was read from (val/ or test/ ...)
        evaluation = getattr(dm, "default_eval_split", "test")  # CIFAR's evaluation split is "test"
        results["meta"]["split_folder"] = {"train": getattr(dm, "train_dir", "train"),
                                           evaluation: dm.eval_dir}.get(dm.eval_split, dm.eval_split)
    for case in cases:
        q, g = CASE_SPACES[case]
        lacking = [missing_spaces[s] for s in (q, g) if s in missing_spaces]
        if lacking:
            results["missing"][case] = "; ".join(dict.fromkeys(lacking))
            continue
        results["cases"][case] = evaluate(q_embs[q], q_labels, embs[g], labels, exclude_self=not separate,
                                          distance=distance)
    queries = (q_embs["new"], q_labels, embedders["new"][2]["digest"]) if separate and "new" in q_embs else None
    results.update(_embeddings=(embs, labels), _features=feats, _datamodule=dm, _device=dev, _queries=queries,
                   _chain={role: embedders[role][2] for role in ("old", "new") if role in embedders})
    return results


BACKFILL_SOURCES = {"fct+side": ("fastfill", "transformation"), "fct": ("fastfill_noside", "transformation_noside")}


def run_backfill(
    artifacts: Path, dm: Any, dev: torch.device, policies: list[str], points: int, seeds: int, distance: str,
    features: dict[str, Tensor] | None = None, labels: Tensor | None = None,
    queries: tuple[Tensor, Tensor, str] | None = None, chain: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Backfilling curves for each transformation variant found (FastFill's head preferred: it has uncertainty).

    ``features`` (checkpoint digest -> ``[N, d]``, from :func:`embed_split`) and ``labels``: the frozen models'
    features of the evaluation split; h is applied to them when they cover the variant's old, side-info and
    new models, and the split's images are read again only when they do not.
    ``queries``: ``(new-model embeddings, labels, new checkpoint digest)`` of a separate query split; None =
    leave-one-out queries from the gallery split itself.
    ``chain``: metadata of the ``old``/``new`` checkpoints the cases used, by role; a transformation trained with
    other ones is refused (:func:`stale_inputs`), as is one whose frozen models' files changed since training.
    Keys of the result are ``"<space> <policy>"``, e.g. ``"fct+side uncertainty"``.
    """
    from fct_lightning.backfill import (
        BackfillContext,
        backfill_curves,
        embed_for_backfill,
        transform_features,
    )

    features = features or {}

    dataset = dm.name
    out: dict[str, Any] = {}
    for space, folders in BACKFILL_SOURCES.items():
        path = next((artifacts / dataset / f / "best.ckpt" for f in folders
                     if (artifacts / dataset / f / "best.ckpt").is_file()), None)
        if path is None:
            log.warning("backfill: no %s checkpoint under %s; skipping %s", " or ".join(folders), artifacts, space)
            continue
        # h is only meaningful with the frozen models it was trained with. The files it loads them from now were
        # compared with its training digests while loading (RetrievalStage.on_load_checkpoint); here they are
        # compared with the old/new checkpoints of the chain whose cases these curves sit next to
        module, meta = load_stage(path, path.parent.name, ("transformation",), dataset)
        check_class_names(meta, path, path.parent.name, getattr(dm, "class_names", None))
        used = dict(chain or {})  # the models the cases (and the separate queries) were embedded with
        if queries is not None and "new" not in used:
            used["new"] = {"path": "the separate queries' new model", "digest": queries[2]}
        problems = stale_inputs(meta, used)
        # a checkpoint written before the training digests were recorded is judged by the models it loads now
        digest = {role: d for role, (d, _) in module.frozen_models().items()}
        problems += [f"{path} loads the {role} checkpoint {digest[role]}, but {m.get('path')} is {m['digest']}"
                     for role, m in used.items() if role in digest and not meta.get(f"{role}_digest")
                     and m.get("digest") and m["digest"] != digest[role]]
        refuse_stale(list(dict.fromkeys(problems)))
        module.to(dev)
        usable = [p for p in policies if p != "uncertainty" or module.uncertainty]
        if len(usable) < len(policies):
            log.warning("backfill: %s has no uncertainty head (train it with --model.uncertainty true); "
                        "skipping the uncertainty policy for %s", path, space)
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
        curves = backfill_curves(BackfillContext.from_embeddings(emb), usable, seeds=tuple(range(seeds)),
                                 points=points, distance=distance, **query)
        out.update({f"{space} {policy}": dict(curve, checkpoint=str(path), digest=meta["digest"], source=path.parent.name)
                    for policy, curve in curves.items()})
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """Rows = cases, columns = metrics (percent); missing cases listed with the reason."""
    lines = ["| case | top-1 | top-5 | mAP | mAP@R |", "|---|---|---|---|---|"]
    for case, m in results["cases"].items():
        lines.append(f"| {case} | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRICS) + " |")
    for case, why in results["missing"].items():
        lines.append(f"| {case} | missing: {why} | | | |")
    for name, curve in results.get("backfill", {}).items():
        lines.append(f"| backfill {name} (AUC) | " + " | ".join(f"{100 * curve['auc_mean'][k]:.1f}" for k in METRICS) + " |")
    return "\n".join(lines)


def log_to_wandb(results: dict[str, Any], artifacts: Path, job_type: str = "eval", name: str | None = None) -> None:
    """Results as a W&B Table plus summary metrics, in the dataset's group (offline without credentials).

    Summary keys: ``<case>/<metric>`` and, for backfilling curves, ``backfill/<gallery> <policy>/auc/<metric>``
    (mean over the curve's points). The run is named ``name`` (default ``<dataset>-<job_type>``).
    """
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; results are not logged to W&B (pip install wandb)")
        return

    from fct_lightning.loggers import ensure_wandb_mode, wandb_project

    mode = ensure_wandb_mode("skip W&B with --no_wandb")
    dataset = results["meta"]["dataset"]
    run = wandb.init(project=wandb_project(), group=dataset, job_type=job_type, name=name or f"{dataset}-{job_type}",
                     dir=str(artifacts), mode=mode if mode in ("online", "offline", "disabled") else None,
                     config=results["meta"], reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"))
    table = wandb.Table(columns=["case", *METRICS])
    for case, m in results["cases"].items():
        table.add_data(case, *(m[k] for k in METRICS))
        for k in METRICS:
            run.summary[f"{case}/{k}"] = m[k]
    for curve_name, curve in results.get("backfill", {}).items():
        for k, v in curve.get("auc_mean", {}).items():
            run.summary[f"backfill/{curve_name}/auc/{k}"] = v
    run.log({"results": table})
    run.finish()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="fct-eval", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=sorted(DATAMODULES))
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated, from: " + ",".join(CASE_SPACES))
    p.add_argument("--out", default=None, help="results JSON (default <artifacts>/<dataset>/results/eval.json)")
    p.add_argument("--split", default=None, help="evaluation split (default: the datamodule's eval_split)")
    p.add_argument("--query_split", default=None,
                   help="separate query set (e.g. query): queries from it, gallery from --gallery_split")
    p.add_argument("--gallery_split", default=None, help="separate gallery set (e.g. gallery); with --query_split")
    p.add_argument("--data_root", "--data.root", dest="data_root", default=None)
    p.add_argument("--distance", default="l2", choices=("l2", "cosine"))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--no_wandb", action="store_true", help="do not log the results to W&B")
    p.add_argument("--backfill", default=None, help="backfilling policies, e.g. random,uncertainty,distance")
    p.add_argument("--points", type=int, default=22, help="backfilled fractions evaluated (0%% and 100%% included)")
    p.add_argument("--backfill_seeds", type=int, default=3, help="seeds averaged for the random policy")
    args = p.parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    out = Path(args.out or Path(args.artifacts) / args.dataset / "results" / "eval.json")
    try:
        # every option is checked before the (possibly long) evaluation, so a mistake costs nothing
        if not cases:
            raise ValueError(f"--cases {args.cases!r} names no case; choose from {list(CASE_SPACES)}")
        if out.is_dir() or out.suffix != ".json":
            raise ValueError(f"--out {out} must be a .json file path (it is "
                             f"{'a folder' if out.is_dir() else 'not a .json name'})")
        policies = [p.strip() for p in (args.backfill or "").split(",") if p.strip()]
        if args.backfill is not None:
            from fct_lightning.backfill import get_policy

            if not policies:
                raise ValueError(f"--backfill {args.backfill!r} names no policy; e.g. random,uncertainty,distance")
            for name in policies:
                get_policy(name)
            if args.points < 2:
                raise ValueError(f"--points {args.points}: a curve needs at least 2 points (0% and 100% backfilled)")
            if args.backfill_seeds < 1:
                raise ValueError(f"--backfill_seeds {args.backfill_seeds} must be at least 1")
        results = run_eval(args.dataset, args.artifacts, cases, args.split, args.distance, args.data_root,
                           args.device, args.batch_size, args.query_split, args.gallery_split)
        if not results["cases"]:
            raise ValueError(f"no case could be evaluated under --artifacts {args.artifacts} (dataset "
                             f"{args.dataset}): {results['missing']}; train the stages first or fix --artifacts / "
                             f"--dataset; {out} was left as it was")
        if policies:
            dm = results.pop("_datamodule")
            if "query_split" in results["meta"] and results["_queries"] is None:
                raise ValueError("backfilling curves with a separate query split need the new model's queries: "
                                 "evaluate a case with new as the query model too (e.g. new/new, the default)")
            results["backfill"] = run_backfill(Path(args.artifacts), dm, results.pop("_device"), policies,
                                               args.points, args.backfill_seeds, args.distance,
                                               results.pop("_features"), results["_embeddings"][1],
                                               results["_queries"], results["_chain"])
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"fct-eval: {err}") from err
    for key in ("_embeddings", "_features", "_datamodule", "_device", "_queries", "_chain"):
        results.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"\nresults written to {out} ({time.perf_counter() - started:.1f} s)")
    if not args.no_wandb:
        log_to_wandb(results, Path(args.artifacts), name=f"{args.dataset}-eval-{out.stem}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
