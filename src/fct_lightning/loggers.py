"""Default experiment logger: Weights & Biases, offline by itself when there are no credentials."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

WANDB_PROJECT_ENV = "FCT_WANDB_PROJECT"
DEFAULT_PROJECT = "fct-lightning"


def wandb_project() -> str:
    """The W&B project of every run (training, eval, report): ``$FCT_WANDB_PROJECT`` or ``fct-lightning``."""
    return os.environ.get(WANDB_PROJECT_ENV) or DEFAULT_PROJECT


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(wandb_host())
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_host() -> str:
    """The W&B server whose ``~/.netrc`` entry holds the key: the host of ``$WANDB_BASE_URL`` (a private server),
    else ``api.wandb.ai``."""
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL", "")
    return urlparse(url if "//" in url else f"//{url}").hostname or "api.wandb.ai"


def ensure_wandb_mode(opt_out: str = "turn logging off with --trainer.logger false") -> str:
    """Set ``WANDB_MODE=offline`` when no mode is chosen and there are no credentials; return the mode.

    The run is written under the save directory and can be uploaded later with ``wandb sync``; nothing prompts.
    ``opt_out`` completes the warning with the calling command's own way to skip W&B.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_has_credentials():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.warning(
        "No W&B credentials found: logging offline. Upload later with `wandb sync <dir>/wandb/offline-run-*`, "
        "or %s.", opt_out)
    return "offline"


def default_logger(dataset: str, stage: str, save_dir: str | Path, seed: int | None = None,
                   variant: str | None = None) -> Logger:
    """The W&B logger every ``fct-fit`` run uses unless ``--trainer.logger`` says otherwise.

    Runs are grouped by dataset, with ``job_type`` = stage and the name ``<dataset>-<variant>-seed<seed>``, so BCT
    and FCT runs on the same data sit side by side in one W&B group. ``variant`` is the stage's artifacts folder
    (e.g. ``transformation_noside``, ``fastfill``; default: the stage), so that the four transformation runs of a
    chain have different names; ``seed`` is the run's ``--seed``.
    """
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning("wandb is not installed: logging to CSV under %s instead (pip install wandb).", save_dir)
        return CSVLogger(save_dir, name=f"{dataset}-{variant or stage}")
    mode = ensure_wandb_mode()
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    name = f"{dataset}-{variant or stage}" + (f"-seed{seed}" if seed is not None else "")
    return WandbLogger(
        project=wandb_project(),
        group=dataset,
        job_type=stage,
        name=name,
        save_dir=str(save_dir),
        offline=mode == "offline",
        settings=_quiet_settings(),
    )


def _quiet_settings():
    import wandb

    return wandb.Settings(silent=True, console="off")


RESULT_METRICS = ("top1", "top5", "map", "map@r")


def _start_run(wandb: Any, meta: dict[str, Any], artifacts: Path, job_type: str, name: str | None = None) -> Any:
    """A results run in the dataset's group, named ``name`` (default ``<dataset>-<job_type>``), configured with
    ``meta``; offline without credentials."""
    mode = ensure_wandb_mode("skip W&B with --no_wandb")
    dataset = meta["dataset"]
    return wandb.init(project=wandb_project(), group=dataset, job_type=job_type, name=name or f"{dataset}-{job_type}",
                      dir=str(artifacts), mode=mode if mode in ("online", "offline", "disabled") else None,
                      config=meta, reinit="finish_previous", settings=_quiet_settings())


def eval_summary(results: dict[str, Any]) -> dict[str, float]:
    """The summary metrics an eval (or report) run logs: ``<case>/<metric>`` and, per backfilling curve,
    ``backfill/<gallery> <policy>/auc/<metric>`` (the mean over the curve's points)."""
    out = {f"{case}/{k}": m[k] for case, m in results["cases"].items() for k in RESULT_METRICS}
    for curve_name, curve in results.get("backfill", {}).items():
        out.update({f"backfill/{curve_name}/auc/{k}": v for k, v in curve.get("auc_mean", {}).items()})
    return out


#: the x axis of the backfilling curves an eval run logs as history (the share of the gallery re-embedded)
BACKFILL_FRACTION = "backfill/fraction"


def backfill_history(results: dict[str, Any]) -> list[dict[str, float]]:
    """One history row per backfilling point: ``backfill/fraction`` and ``backfill/<gallery> <policy>/<metric>``
    of every curve evaluated at that fraction (curves of the same number of points share rows)."""
    rows: dict[float, dict[str, float]] = {}
    for curve_name, curve in results.get("backfill", {}).items():
        for n, fraction in enumerate(curve.get("fractions", [])):
            row = rows.setdefault(float(fraction), {BACKFILL_FRACTION: float(fraction)})
            row.update({f"backfill/{curve_name}/{k}": float(v[n]) for k, v in curve.get("curves", {}).items()})
    return [rows[f] for f in sorted(rows)]


def versions_summary(results: dict[str, Any]) -> dict[str, float]:
    """A version chain's summary metrics: ``versions/<kind>/<metric>/ac|am`` of every complete matrix."""
    return {f"versions/{kind}/{metric}/{name}": value for kind, per in results["scores"].items()
            for metric, s in per.items() for name, value in s.items() if value is not None}


#: the media key of the version chain's heat-maps
VERSIONS_HEATMAP = "versions/heatmap"
#: the media key of fct-eval's retrieval grid
GRID_MEDIA = "retrieval/grid"
#: the key of the same grid as a W&B Table of images (one row per query and case)
GRID_TABLE = "retrieval/grid_table"


def grid_table(wandb: Any, grid: Any) -> Any:
    """The retrieval grid (:class:`fct_lightning.grids.Grid`) as a ``wandb.Table``: one row per (query, case) with
    the query image, its class, the case, its top-k images (captioned with their class and ``match``/``miss``) and the
    number of hits of the query's class, so the W&B table can be filtered and sorted by case."""
    import numpy as np

    from fct_lightning.grids import displayable

    def image(row: int, caption: str) -> Any:
        return wandb.Image((255 * displayable(grid.images[row])).round().astype(np.uint8), caption=caption)

    table = wandb.Table(columns=["query", "class", "case", *(f"top-{j + 1}" for j in range(grid.k)), "matches"])
    for q, case, hits in grid.lines():
        cells = [image(g, f"{grid.class_name(g)} ({'match' if grid.same_class(q, g) else 'miss'})") for g in hits]
        table.add_data(image(q, grid.class_name(q)), grid.class_name(q), case, *cells,
                       sum(grid.same_class(q, g) for g in hits))
    return table


def log_to_wandb(results: dict[str, Any], artifacts: Path, job_type: str = "eval", name: str | None = None,
                 media: dict[str, Path] | None = None, grid: Any = None) -> None:
    """Results as a W&B Table plus summary metrics (:func:`eval_summary`) and the backfilling curves as history
    (:func:`backfill_history`), in the dataset's group (offline without credentials), ``media`` (key: image
    file, e.g. :data:`GRID_MEDIA`) and the retrieval ``grid`` as a table of images (:data:`GRID_TABLE`). The run is
    named ``name`` (default ``<dataset>-<job_type>``)."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; results are not logged to W&B (pip install wandb)")
        return

    run = _start_run(wandb, results["meta"], artifacts, job_type, name)
    table = wandb.Table(columns=["case", *RESULT_METRICS])
    for case, m in results["cases"].items():
        table.add_data(case, *(m[k] for k in RESULT_METRICS))
    for row in backfill_history(results):
        run.log(row)
    run.summary.update(eval_summary(results))
    images = {key: wandb.Image(str(f)) for key, f in (media or {}).items() if Path(f).is_file()}
    if grid is not None:
        images[GRID_TABLE] = grid_table(wandb, grid)
    run.log({"results": table, **images})
    run.finish()


def log_versions_to_wandb(results: dict[str, Any], artifacts: Path, heatmap: Path | None = None) -> None:
    """A version chain's matrices as one W&B Table (a row per kind, query and gallery version), AC and AM as
    summary metrics (:func:`versions_summary`) and the heat-map image ``heatmap`` (offline without credentials)."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; the version matrices are not logged to W&B (pip install wandb)")
        return

    run = _start_run(wandb, results["meta"], artifacts, "versions")
    names = [v["name"] for v in results["versions"]]
    metrics = list(next(iter(results["matrices"].values())))
    table = wandb.Table(columns=["kind", "query", "gallery", *metrics])
    for kind, m in results["matrices"].items():
        for i, query in enumerate(names):
            for j, gallery in enumerate(names):
                if m[metrics[0]][i][j] is not None:
                    table.add_data(kind, query, gallery, *(m[k][i][j] for k in metrics))
    run.summary.update(versions_summary(results))
    logged: dict[str, Any] = {"versions": table}
    if heatmap is not None and Path(heatmap).is_file():
        logged[VERSIONS_HEATMAP] = wandb.Image(str(heatmap))
    run.log(logged)
    run.finish()
