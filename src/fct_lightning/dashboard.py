"""The W&B dashboard of a dataset's chain, as code (wandb-workspaces): BCT vs FCT side by side.

:func:`dashboard_sections` lays the panels out from what the chain produced (fct-eval's results and, when there is
one, fct-versions' results) and the registry's vocabulary, naming only keys that the runs log:

* cross-model bars per metric (``<case>/<metric>`` of the eval run), ``old/old`` first as the floor and ``new/new``
  as the ceiling;
* training curves ``val/<case>/map`` of every cross-model case a stage validates, grouped by stage;
* backfilling curves (``backfill/<gallery> <policy>/<metric>`` against ``backfill/fraction``) and their areas;
* the model-update chain's AC / AM and its heat-maps (``versions/...``);
* fct-eval's retrieval grid (``retrieval/grid``) and its table of images (``retrieval/grid_table``), when it drew
  one.

:func:`build_workspace` turns them into a ``wandb_workspaces`` Workspace; :func:`publish` saves it to W&B when the
machine has credentials and otherwise writes the spec it would create (``dashboard.json``) and says how to publish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fct_lightning import chain
from fct_lightning.loggers import (
    BACKFILL_FRACTION,
    GRID_MEDIA,
    GRID_TABLE,
    RESULT_METRICS,
    VERSIONS_HEATMAP,
    wandb_has_credentials,
    wandb_project,
)

#: the eval run's metrics the bars show, with their titles
BAR_METRICS = {"top1": "top-1", "map@r": "mAP@R", "map": "mAP"}


@dataclass(frozen=True)
class Panel:
    """One panel: ``kind`` ``bar`` (summary metrics of runs), ``line`` (history, ``x`` against ``keys``), ``media``
    (logged images) or ``table`` (a logged W&B Table, ``keys`` = its one key)."""

    kind: str
    title: str
    keys: tuple[str, ...]
    x: str | None = None
    groupby: str | None = None


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _cross_cases_validated_in_training() -> list[str]:
    """The cross-model cases a stage validates while training (those of variants trained on other models; the new
    model's own stage does not search the old gallery)."""
    return [c.name for v in chain.VARIANTS.values() if v.upstream for c in v.cases if c.cross]


def dashboard_sections(results: dict[str, Any], versions: dict[str, Any] | None = None) -> list[Section]:
    """The dashboard's sections for one dataset: ``results`` is fct-eval's (or fct-report's) results, ``versions``
    fct-versions' results or None."""
    order = {c.name: i for i, c in enumerate(chain.cases())}
    cases = sorted(results["cases"], key=lambda c: order.get(c, len(order)))
    sections = [Section("BCT vs FCT: every case of fct-eval (old/old = the floor, new/new = the ceiling)", tuple(
        Panel("bar", f"{title} per case", tuple(f"{c}/{m}" for c in cases)) for m, title in BAR_METRICS.items()))]
    trained = [c for c in _cross_cases_validated_in_training() if c in results["cases"]]
    curves = [Panel("line", f"{c}: validation mAP while training", (f"val/{c}/map",), x="epoch", groupby="stage")
              for c in trained]
    own = tuple(f"val/{c}/map" for c in ("old/old", "new/new") if c in results["cases"])
    if own:
        curves.append(Panel("line", "old/old and new/new: validation mAP while training", own, x="epoch",
                            groupby="stage"))
    if curves:
        sections.append(Section("Training curves (val/<case>/map, grouped by stage)", tuple(curves)))
    backfill = results.get("backfill", {})
    if backfill:
        metrics = [m for m in RESULT_METRICS if all(m in c.get("curves", {}) for c in backfill.values())]
        sections.append(Section("Backfilling: the share of the gallery re-embedded by the new model", tuple(
            [Panel("line", f"backfilling curves: {m}", tuple(f"backfill/{name}/{m}" for name in backfill),
                   x=BACKFILL_FRACTION) for m in metrics]
            + [Panel("bar", "backfilling areas (mean over the points): top-1",
                     tuple(f"backfill/{name}/auc/top1" for name in backfill))])))
    if versions is not None:
        kinds = [k for k, s in versions["scores"].items() if s["top1"]["ac"] is not None]
        names = " -> ".join(v["name"] for v in versions["versions"])
        sections.append(Section(f"Model-update chain {names}", (
            Panel("bar", "AM (mean of the lower triangle), top-1", tuple(f"versions/{k}/top1/am" for k in kinds)),
            Panel("bar", "AC (share of compatible pairs), top-1", tuple(f"versions/{k}/top1/ac" for k in kinds)),
            Panel("media", "compatibility matrices", (VERSIONS_HEATMAP,)))))
    if results.get("grid"):
        shown = ", ".join(results.get("grid_cases", ()))
        sections.append(Section("Retrieval grid: top-5 of fixed queries before and after the update", (
            Panel("media", shown or "the grid", (GRID_MEDIA,)),
            Panel("table", "the grid's images by query and case (filter or sort by case)", (GRID_TABLE,)))))
    return sections


def panel_keys(sections: list[Section]) -> set[str]:
    """Every key the panels name (metrics, x axes and media)."""
    keys = {k for s in sections for p in s.panels for k in p.keys}
    return keys | {p.x for s in sections for p in s.panels if p.x and p.x != "epoch"}


def build_workspace(sections: list[Section], entity: str, project: str, name: str) -> Any:
    """The ``wandb_workspaces`` Workspace of ``sections`` (needs ``pip install wandb-workspaces``)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ValueError("the dashboard is built with wandb-workspaces, which is not installed: pip install "
                         "'fct-lightning[dashboard]' (or pip install wandb-workspaces)") from err

    def make(p: Panel) -> Any:
        if p.kind == "bar":
            return wr.BarPlot(title=p.title, metrics=list(p.keys), orientation="v")
        if p.kind == "line":
            return wr.LinePlot(title=p.title, x=p.x or "Step", y=list(p.keys), groupby=p.groupby)
        if p.kind == "table":
            return wr.WeavePanelSummaryTable(table_name=p.keys[0])
        return wr.MediaBrowser(title=p.title, media_keys=list(p.keys))

    return ws.Workspace(entity=entity, project=project, name=name, sections=[
        ws.Section(name=s.name, panels=[make(p) for p in s.panels], is_open=True) for s in sections])


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The view W&B would store for ``workspace`` (built offline, no request made)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True)


def publish(sections: list[Section], out: str | Path, dataset: str, entity: str | None = None,
            project: str | None = None, online: bool | None = None) -> tuple[str, Path | None]:
    """Save the dashboard to W&B (online: credentials and an entity) or write its spec to ``out``.

    Returns ``(message for the user, the spec file or None)``.
    """
    project = project or wandb_project()
    name = f"{dataset}: BCT vs FCT"
    online = wandb_has_credentials() and entity is not None if online is None else online
    workspace = build_workspace(sections, entity or "<your W&B entity>", project, name)
    if online:
        workspace.save()
        return f"saved the W&B workspace '{name}' of {entity}/{project}: {workspace.url}", None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {"workspace": workspace_spec(workspace), "keys": sorted(panel_keys(sections)),
            "publish": f"fct-report --dataset {dataset} --dashboard --entity <your W&B entity> (on a machine with W&B "
                       "credentials: wandb login, or WANDB_API_KEY) creates this workspace in project "
                       f"{project}"}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(out)
    why = "no W&B credentials on this machine" if entity is not None else "no --entity given"
    return (f"{why}: wrote the dashboard's spec ({sum(len(s.panels) for s in sections)} panels) to {out}; to create "
            f"it, run {spec['publish']}"), out
