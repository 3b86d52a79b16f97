"""``fct-report``: results JSON(s) from ``fct-eval`` -> markdown and CSV tables and a PNG bar chart.

``--dashboard`` also builds the dataset's W&B dashboard (:mod:`fct_lightning.dashboard`): with credentials and
``--entity`` it creates the workspace in the project; otherwise it writes the spec to ``<out_dir>/dashboard.json``
and says how to publish it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fct_lightning.commands import run_command
from fct_lightning.dashboard import dashboard_sections, publish
from fct_lightning.loggers import log_to_wandb
from fct_lightning.report import aggregate, select_runs, write_report


def report_command(argv: list[str] | None = None) -> None:
    """``fct-report`` with ``argv``."""
    p = argparse.ArgumentParser(prog="fct-report", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="*", help="results JSON files (default: <artifacts>/<dataset>/results/*.json)")
    p.add_argument("--dataset", default=None, help="default: the results files' dataset (digits without files)")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--out_dir", default=None, help="default <artifacts>/<dataset>")
    p.add_argument("--no_wandb", action="store_true")
    p.add_argument("--dashboard", action="store_true", help="build the W&B dashboard (BCT vs FCT) of the dataset")
    p.add_argument("--entity", default=None, help="--dashboard: the W&B entity (user or team) to create it in")
    p.add_argument("--project", default=None, help="--dashboard: the W&B project (default: FCT_WANDB_PROJECT or "
                                                   "fct-lightning)")
    args = p.parse_args(argv)
    folder = Path(args.artifacts) / (args.dataset or "digits") / "results"
    paths = args.results or sorted(folder.glob("*.json"))
    if not paths:
        raise ValueError(f"no results files in {folder}: run fct-eval first (make <dataset>-eval), or pass the "
                         "files (fct-report FILE [FILE ...]) or --artifacts DIR --dataset NAME")
    runs = select_runs(paths)
    dataset = runs[0].get("meta", {}).get("dataset") or args.dataset or "digits"
    if args.dataset and dataset != args.dataset:
        raise ValueError(f"--dataset {args.dataset}, but the results files are of {dataset}; drop --dataset or "
                         "pass that dataset's files")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.artifacts) / dataset
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {out_dir} is a file; pass a folder for report.md, .csv and .png")
    table = aggregate(runs)
    files = write_report(runs, out_dir, f"{dataset}: compatibility", table)
    print(files["md"].read_text())
    print("written: " + ", ".join(str(f) for f in files.values()))
    if args.dashboard:
        chain_versions = Path(args.artifacts) / dataset / "versions" / "results.json"
        versions = json.loads(chain_versions.read_text()) if chain_versions.is_file() else None
        message, _ = publish(dashboard_sections(runs[0], versions), out_dir / "dashboard.json", dataset,
                             entity=args.entity, project=args.project)
        print(f"fct-report --dashboard: {message}")
    if not args.no_wandb:
        log_to_wandb({"cases": {c: {k: v[0] for k, v in m.items()}
                                for c, m in table.items() if not c.startswith("backfill")},
                      "meta": dict(runs[0]["meta"], n_runs=len(runs))},
                     Path(args.artifacts), job_type="report", name=f"{dataset}-report")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-report``."""
    run_command("fct-report", report_command, argv)


if __name__ == "__main__":  # pragma: no cover
    main()
