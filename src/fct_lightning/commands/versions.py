"""``fct-versions``: train a chain of model versions v1 -> v2 -> ... -> vK and write its compatibility matrices.

``fct-versions --dataset D [--artifacts DIR] [--plan FILE] [--seed N] [--recipe DIR] [--eval_only] [-- fct-fit
options for every run]`` reads the version plan (default: the packaged ``configs/<D>/versions.yaml``), trains every
model of it that is not trained yet, each as its own ``fct-fit`` run (the chain's old, side-info and new models and
its transformation where the plan uses them, then the plan's own versions and updates), then embeds the evaluation
split with every version and writes ``<DIR>/<D>/versions/results.json``, ``versions.md`` and ``versions.png``.
Stopped at any point, the same command goes on from the finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fct_lightning.commands import run_command
from fct_lightning.commands.processes import child_process
from fct_lightning.loggers import log_versions_to_wandb
from fct_lightning.versions import evaluate_versions, load_plan, plan_steps, run_steps, versions_dir
from fct_lightning.versions.report import write_versions_report


def fit_in_subprocess(argv: Sequence[str]) -> int:
    """Run ``fct-fit argv`` as its own process (as make does), stopped if fct-versions is (see
    :mod:`fct_lightning.commands.processes`); returns its exit status."""
    return child_process([sys.executable, "-m", "fct_lightning.commands.fit", *argv])


def versions_command(argv: list[str] | None = None) -> dict:
    """``fct-versions`` with ``argv``; returns the results."""
    argv = list(argv or [])
    fit_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="fct-versions", description=__doc__.split("\n")[0],
                                epilog="Options after -- go to every fct-fit run (e.g. -- --config "
                                       "configs/trainer/cpu.yaml --trainer.devices 2).")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--artifacts", default="artifacts", help="the chain's artifacts root (make's ARTIFACTS)")
    p.add_argument("--plan", default=None, help="a version plan YAML (default: configs/<dataset>/versions.yaml)")
    p.add_argument("--seed", type=int, default=0, help="fct-fit --seed of every run (as make SEED=N)")
    p.add_argument("--recipe", default=None, help="a recipe folder with one <stage>.yaml per stage (make RECIPE)")
    p.add_argument("--eval_only", action="store_true", help="train nothing; evaluate the trained plan")
    p.add_argument("--data_root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=None, help="images per evaluation batch")
    p.add_argument("--distance", default="l2", choices=("l2", "cosine"))
    p.add_argument("--no_wandb", action="store_true", help="do not log the matrices to W&B")
    args = p.parse_args(own)
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} is negative; use a seed of 0 or more")
    plan = load_plan(args.dataset, args.plan)
    common = [*fit_args, *(["--data.root", args.data_root] if args.data_root else [])]
    steps, version_ckpt, h_ckpt = plan_steps(plan, args.dataset, args.artifacts, args.seed, args.recipe, common)
    start = time.perf_counter()
    if not args.eval_only:
        ran = run_steps(steps, fit_in_subprocess)
        print(f"fct-versions: trained {', '.join(ran) or 'nothing (every model of the plan was trained)'} "
              f"in {time.perf_counter() - start:.0f} s")
    results = evaluate_versions(plan, args.dataset, args.artifacts, version_ckpt, h_ckpt, data_root=args.data_root,
                                device=args.device, batch_size=args.batch_size, distance=args.distance)
    out = versions_dir(args.artifacts, args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False))  # no NaN: empty entries are null
    tmp.replace(path)
    files = write_versions_report(results, out)
    print(files["md"].read_text())
    print("written: " + ", ".join(str(f) for f in [path, *files.values()]))
    if not args.no_wandb:
        log_versions_to_wandb(results, Path(args.artifacts), files.get("png"))
    return results


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-versions``."""
    run_command("fct-versions", versions_command, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # pragma: no cover
    main()
