"""``fct-eval``: evaluate every compatibility case whose checkpoints exist, on one evaluation split.

Each *space* is one way to embed an image (``old``, ``new``, ``side``, ``bct``, ``fct`` = h(old),
``fct+side`` = h(old, side)); each *case* is ``<query space>/<gallery space>`` searched leave-one-out on the
evaluation split, or from a query split into a gallery split (``--query_split``, ``--gallery_split``); both come
from the chain's registry (:mod:`fct_lightning.chain`). Images are decoded and embedded once for all spaces (GPU when
there is one). Results JSON: ``{"cases": {case: {top1, top5, map, "map@r"}}, "missing": {case: why}, "meta": {...},
"backfill": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from fct_lightning import chain
from fct_lightning.backfill import get_policy
from fct_lightning.commands import run_command
from fct_lightning.data import DATAMODULES
from fct_lightning.evaluation import markdown_table, run_backfill, run_eval
from fct_lightning.loggers import log_to_wandb


def evaluate_command(argv: list[str] | None = None) -> dict[str, Any]:
    """``fct-eval`` with ``argv``; returns the results written."""
    p = argparse.ArgumentParser(prog="fct-eval", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=sorted(DATAMODULES))
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--cases", default=",".join(chain.default_cases()),
                   help="comma-separated, from: " + ",".join(c.name for c in chain.cases()))
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
    # every option is checked before the (possibly long) evaluation, so a mistake costs nothing
    if not cases:
        raise ValueError(f"--cases {args.cases!r} names no case; choose from {[c.name for c in chain.cases()]}")
    if out.is_dir() or out.suffix != ".json":
        raise ValueError(f"--out {out} must be a .json file path (it is "
                         f"{'a folder' if out.is_dir() else 'not a .json name'})")
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
                                           results["_queries"], results["_chain"], results["_reference_correct"])
    for key in ("_embeddings", "_features", "_datamodule", "_device", "_queries", "_chain", "_reference_correct"):
        results.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"\nresults written to {out} ({time.perf_counter() - started:.1f} s)")
    if not args.no_wandb:
        log_to_wandb(results, Path(args.artifacts), name=f"{args.dataset}-eval-{out.stem}")
    return results


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-eval``."""
    run_command("fct-eval", evaluate_command, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
