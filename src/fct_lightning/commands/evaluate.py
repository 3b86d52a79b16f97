"""``fct-eval``: evaluate every compatibility case whose checkpoints exist, on one evaluation split.

Each *space* is one way to embed an image (``old``, ``new``, ``side``, ``bct``, ``fct`` = h(old),
``fct+side`` = h(old, side)); each *case* is ``<query space>/<gallery space>`` searched leave-one-out on the
evaluation split, or from a query split into a gallery split (``--query_split``, ``--gallery_split``); both come
from the chain's registry (:mod:`fct_lightning.chain`). Images are decoded and embedded once for all spaces (GPU when
there is one). Results JSON: ``{"cases": {case: {top1, top5, map, "map@r"}}, "missing": {case: why}, "meta": {...},
"backfill": {...}, "grid": "<out>-grid.png", "grid_cases": [case, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fct_lightning import chain
from fct_lightning.backfill import backfilled_gallery, get_policy
from fct_lightning.commands import run_command
from fct_lightning.data import DATAMODULES
from fct_lightning.devices import resolve_device
from fct_lightning.evaluation import markdown_table, run_backfill, run_eval
from fct_lightning.evaluation_stores import PAIRING, IndexSpec, run_store_backfill, run_store_eval
from fct_lightning.grids import Grid, build_grid, draw_grid
from fct_lightning.loggers import GRID_MEDIA, log_to_wandb

log = logging.getLogger(__name__)


def evaluate_command(argv: list[str] | None = None) -> dict[str, Any]:
    """``fct-eval`` with ``argv``; returns the results written."""
    p = argparse.ArgumentParser(prog="fct-eval", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=sorted(DATAMODULES))
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--cases", default=None, help="comma-separated, from: " + ",".join(c.name for c in chain.cases())
                   + " (default: " + ",".join(chain.default_cases()) + "; on stores, those whose spaces they have)")
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
    p.add_argument("--grid", type=int, default=6, help="queries in the retrieval grid (<out>-grid.png: their top-5 "
                   "under old/old, new/old, fct+side/old, new/new); 0 = none")
    p.add_argument("--grid_backfill", type=float, default=None, help="with --backfill: the grid also shows new "
                   "queries against the gallery with this share backfilled (fct+side's, by the first of the "
                   "--backfill policies that is deterministic and deployable, e.g. uncertainty; default 0.1); 0 = "
                   "no such row")
    s = p.add_argument_group("on embedding stores (instead of checkpoints and images)")
    s.add_argument("--query_store", default=None, help="store of the queries' spaces (e.g. new, from fct-embed)")
    s.add_argument("--gallery_store", default=None, help="store of the gallery spaces (old, fct+side, ...); the "
                   "same items as --query_store = leave-one-out")
    s.add_argument("--space", action="append", default=[], help="QUERY_SPACE/GALLERY_SPACE of the stores to "
                   "evaluate as a case (e.g. new/fct+side-bf1); repeat or comma-separate")
    s.add_argument("--pairing", default="auto", choices=PAIRING, help="auto: leave-one-out when the stores hold "
                   "the same items in the same order, else a separate query set")
    s.add_argument("--index", default=None, help="also evaluate through this FAISS index_factory string (Flat, "
                   "IVF64,Flat, HNSW32, ...), built in memory per gallery (and per backfilling point)")
    s.add_argument("--index_path", default=None, help="also evaluate through this fct-index folder (the cases "
                   "whose gallery is its space); refused when that space was rewritten since")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default FAISS's 1)")
    s.add_argument("--search_params", default=None, help="more FAISS search parameters of the index, NAME=VALUE,...: "
                   "efSearch (HNSW, default 16), quantizer_efSearch, ht")
    s.add_argument("--index_k", type=int, default=None, help="hits per query through the index (default: the "
                   "largest class, so mAP@R is complete)")
    s.add_argument("--train_rows", type=int, default=None, help="training sample of a --index that needs training "
                   "(default: the whole gallery)")
    args = p.parse_args(argv)
    if args.query_store is not None or args.gallery_store is not None:
        return _on_stores(args)
    index_options = {"--index": args.index, "--index_path": args.index_path, "--nprobe": args.nprobe,
                     "--search_params": args.search_params,
                     "--index_k": args.index_k, "--train_rows": args.train_rows, "--space": args.space or None,
                     "--pairing": None if args.pairing == "auto" else args.pairing}
    given = [k for k, v in index_options.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} evaluate embedding stores: give --query_store and --gallery_store "
                         "too (embed them with fct-embed / fct-transform)")
    if args.cases is None:
        args.cases = ",".join(chain.default_cases())
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    out = Path(args.out or Path(args.artifacts) / args.dataset / "results" / "eval.json")
    # every option is checked before the (possibly long) evaluation, so a mistake costs nothing
    if not cases:
        raise ValueError(f"--cases {args.cases!r} names no case; choose from {[c.name for c in chain.cases()]}")
    if out.is_dir() or out.suffix != ".json":
        raise ValueError(f"--out {out} must be a .json file path (it is "
                         f"{'a folder' if out.is_dir() else 'not a .json name'})")
    policies = _policies(args)
    if args.grid < 0:
        raise ValueError(f"--grid {args.grid}: the number of queries in the retrieval grid is 0 (none) or more")
    if args.grid_backfill is not None and not policies:
        raise ValueError(f"--grid_backfill {args.grid_backfill} draws a backfilled gallery of the curves: give "
                         "--backfill POLICIES too (e.g. --backfill random,uncertainty)")
    if args.grid_backfill is not None and not 0.0 <= args.grid_backfill <= 1.0:
        raise ValueError(f"--grid_backfill {args.grid_backfill} must be a share of the gallery in [0, 1] (0 = no "
                         "backfilled row in the grid)")
    results = run_eval(args.dataset, args.artifacts, cases, args.split, args.distance, args.data_root,
                       args.device, args.batch_size, args.query_split, args.gallery_split)
    if not results["cases"]:
        raise ValueError(f"no case could be evaluated under --artifacts {args.artifacts} (dataset "
                         f"{args.dataset}): {results['missing']}; train the stages first or fix --artifacts / "
                         f"--dataset; {out} was left as it was")
    dm = results["_datamodule"]
    galleries: dict[str, Any] = {}
    if policies:
        results.pop("_datamodule")
        if "query_split" in results["meta"] and results["_queries"] is None:
            raise ValueError("backfilling curves with a separate query split need the new model's queries: "
                             "evaluate a case with new as the query model too (e.g. new/new, the default)")
        results["backfill"] = run_backfill(Path(args.artifacts), dm, results.pop("_device"), policies,
                                           args.points, args.backfill_seeds, args.distance,
                                           results.pop("_features"), results["_embeddings"][1],
                                           results["_queries"], results["_chain"], results["_reference_correct"],
                                           galleries=galleries)
    # last, when every check has passed (a refused evaluation writes nothing); leave-one-out: hits over one split
    grid = None
    if args.grid > 0 and "query_split" not in results["meta"]:
        embeddings, labels = results["_embeddings"]
        fraction = 0.1 if args.grid_backfill is None else args.grid_backfill
        grid = build_grid(embeddings, labels, {c: (chain.case(c).query, chain.case(c).gallery)
                                               for c in results["cases"]}, dm.eval_dataloader(dm.eval_split),
                          args.grid, distance=args.distance, extra=_backfilled_case(galleries, labels, fraction),
                          class_names=getattr(dm, "class_names", None))
        if grid is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            path = draw_grid(grid, out.with_name(f"{out.stem}-grid.png"),
                             f"{args.dataset}: top-5 of fixed queries (green: same class)")
            results.update(grid=path.name, grid_cases=list(grid.hits))
    for key in ("_embeddings", "_features", "_datamodule", "_device", "_queries", "_chain", "_reference_correct"):
        results.pop(key, None)
    return _write(results, out, args, started, f"{args.dataset}-eval-{out.stem}", grid)


def _backfilled_case(galleries: dict[str, Any], labels: Tensor, fraction: float) -> dict[str, tuple[Tensor, Tensor]]:
    """The grid's backfilled case: ``{"new/<space>, <f>% backfilled (<policy>)": (new queries, gallery)}`` for the
    gallery of the grid's ``fct+side/old`` (else the first with curves), along the first deterministic deployable
    policy given (uncertainty, confident; else random with seed 0, else an oracle); empty when there is none, when
    ``fraction`` is 0, or when its items are not the grid's."""
    if not galleries or fraction == 0:
        return {}
    wanted = chain.case("fct+side/old").gallery
    space = wanted if wanted in galleries else next(iter(galleries))
    ctx, usable = galleries[space]
    if not torch.equal(ctx.labels.cpu(), labels.cpu()):  # not the same items in the same order: no row
        log.warning("grid: the %s backfilling gallery's items are not the evaluation split's; no backfilled row",
                    space)
        return {}
    deployable = [p for p in usable if not get_policy(p).oracle] or usable
    policy = next((p for p in deployable if not get_policy(p).stochastic), deployable[0])
    name = f"new/{space}, {100 * fraction:g}% backfilled ({policy})"
    return {name: (ctx.gallery_new, backfilled_gallery(ctx, policy, fraction))}


def _policies(args: argparse.Namespace) -> list[str]:
    """The ``--backfill`` policies, each checked (with ``--points`` and ``--backfill_seeds``) before any work."""
    policies = [p.strip() for p in (args.backfill or "").split(",") if p.strip()]
    if args.backfill is not None:
        if not policies:
            raise ValueError(f"--backfill {args.backfill!r} names no policy; e.g. random,uncertainty,distance")
        for name in policies:
            get_policy(name)
        if args.points < 2:
            raise ValueError(f"--points {args.points}: a curve needs at least 2 points (0% and 100% backfilled)")
        if args.backfill_seeds < 1:
            raise ValueError(f"--backfill_seeds {args.backfill_seeds} must be at least 1")
    return policies


def _write(results: dict[str, Any], out: Path, args: argparse.Namespace, started: float, name: str,
           grid: Grid | None = None) -> dict[str, Any]:
    """Write the results file, print the table, log to W&B unless ``--no_wandb`` (with the retrieval ``grid``'s
    images as a table when there is one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"\nresults written to {out} ({time.perf_counter() - started:.1f} s)")
    if not args.no_wandb:
        media = {GRID_MEDIA: out.parent / results["grid"]} if results.get("grid") else {}
        log_to_wandb(results, Path(args.artifacts), name=name, media=media, grid=grid)
    return results


def _on_stores(args: argparse.Namespace) -> dict[str, Any]:
    """``fct-eval --query_store Q --gallery_store G``: the cases (and curves) from stored vectors, exact and, with
    ``--index``/``--index_path``, through an index."""
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.query_store is None or args.gallery_store is None:
        raise ValueError("give both --query_store and --gallery_store (the same store twice for leave-one-out)")
    images = {"--split": args.split, "--query_split": args.query_split, "--gallery_split": args.gallery_split,
              "--data_root": args.data_root, "--batch_size": args.batch_size}
    given = [k for k, v in images.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} choose images to embed; on stores the items are the stores' own: "
                         "leave them out")
    cases = None if args.cases is None else tuple(c.strip() for c in args.cases.split(",") if c.strip())
    if cases is not None and not cases:
        raise ValueError(f"--cases {args.cases!r} names no case; choose from {[c.name for c in chain.cases()]}")
    spaces = [x.strip() for arg in args.space for x in arg.split(",") if x.strip()]
    gallery = Path(args.gallery_store)
    out = Path(args.out or gallery.parent / f"{gallery.name}.eval.json")
    if out.is_dir() or out.suffix != ".json":
        raise ValueError(f"--out {out} must be a .json file path (it is "
                         f"{'a folder' if out.is_dir() else 'not a .json name'})")
    index = None
    if args.index is not None or args.index_path is not None:
        if args.index is not None and args.index_path is not None:
            raise ValueError("give --index FACTORY (built in memory) or --index_path INDEX (an fct-index folder), "
                             "not both")
        index = IndexSpec(args.index, args.index_path, args.nprobe, args.index_k, args.train_rows, args.search_params)
    else:
        given = [k for k, v in (("--nprobe", args.nprobe), ("--index_k", args.index_k),
                                ("--train_rows", args.train_rows), ("--search_params", args.search_params))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} set the index search: give --index FACTORY or --index_path INDEX")
    policies = _policies(args)
    results = run_store_eval(args.query_store, args.gallery_store, cases, spaces, args.distance,
                             resolve_device(args.device), index, args.pairing)
    if policies:
        if index is not None and index.path is not None:
            results["meta"]["index"]["backfill"] = ("exact only: an index folder holds one fixed gallery; give "
                                                    "--index FACTORY to search each backfilled state")
        results["backfill"] = run_store_backfill(results, policies, args.points, args.backfill_seeds, args.distance,
                                                 index)
    for key in [k for k in results if k.startswith("_")]:
        results.pop(key)
    return _write(results, out, args, started, f"{results['meta']['dataset'] or 'stores'}-eval-{out.stem}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-eval``."""
    run_command("fct-eval", evaluate_command, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
