"""A version chain's results as markdown (``versions.md``) and heat-maps (``versions.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fct_lightning.retrieval.compat import write_heatmap

#: how the report names each way of holding the gallery
KIND_TITLES = {"fct": "transformed at every update (h in sequence)", "direct": "transformed from v1 directly where "
               "trained", "none": "not transformed (independently trained models)"}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _matrix_table(m: list[list[float | None]], names: list[str]) -> list[str]:
    lines = ["| query \\ gallery | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {q} | " + " | ".join(_pct(v) for v in row) + " |" for q, row in zip(names, m, strict=True)]
    return lines


def update_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """The newest version's ways to serve the oldest gallery, with re-embedding as the ceiling:
    ``[(row name, {metric: value})]``."""
    names = [v["name"] for v in results["versions"]]
    k, mats = len(names), results["matrices"]
    last, first = names[-1], names[0]

    def entry(kind: str, i: int, j: int) -> dict[str, float | None] | None:
        if kind not in mats or mats[kind]["top1"][i][j] is None:
            return None
        return {metric: values[i][j] for metric, values in mats[kind].items()}

    rows = [(f"{first}/{first} (before any update)", entry("fct", 0, 0)),
            (f"{last}/{first}, not transformed", entry("none", k - 1, 0)),
            (f"{last}/{first}, h applied in sequence ({' -> '.join(names)})", entry("fct", k - 1, 0))]
    if "direct" in mats:
        rows.append((f"{last}/{first}, one h {first} -> {last}", entry("direct", k - 1, 0)))
    if k > 2:
        rows.append((f"{last}/{names[-2]}, the {names[-2]} gallery moved by one h", entry("fct", k - 1, k - 2)))
    rows.append((f"{last}/{last}, re-embedded (ceiling)", entry("fct", k - 1, k - 1)))
    return [(name, e) for name, e in rows if e is not None]


def markdown(results: dict[str, Any], heading: str = "##") -> str:
    names = [v["name"] for v in results["versions"]]
    meta = results["meta"]
    lines = [f"{heading} Model-update chain: {' -> '.join(names)}", "",
             f"{meta['dataset']}, {meta['split']} split ({meta['n_items']} items, leave-one-out, {meta['distance']}); "
             f"every update trains `{meta['transformation']}`"
             + (", side-info stored once at the first version" if meta.get("side_info") else "") + ".", "",
             "| version | trained on | from |", "|---|---:|---|"]
    lines += [f"| {v['name']} | {v['classes'] or 'all'} classes | {v['source']} |" for v in results["versions"]]
    lines += ["", f"Updating to {names[-1]} (top-1 / mAP@R / negative flips against the gallery's own system, %):", "",
              "| gallery held as | top-1 | mAP@R | neg. flips |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {_pct(e['top1'])} | {_pct(e['map@r'])} | {_pct(e['neg_flip'])} |"
              for name, e in update_rows(results)]
    for kind, m in results["matrices"].items():
        s = results["scores"][kind]
        summary = ", ".join(f"{metric} AC {sc['ac']:.2f} AM {100 * sc['am']:.1f}" for metric, sc in s.items()
                            if metric in ("top1", "map@r") and sc["ac"] is not None)
        lines += ["", f"Compatibility matrix, gallery {KIND_TITLES[kind]}: top-1 (%), rows = query version, columns "
                      f"= gallery version" + (f"; {summary}" if summary else "; incomplete (dimensions differ)") + ".",
                  "", *_matrix_table(m["top1"], names)]
    lines += ["", "AC: share of pairs i > j with M[i][j] > M[j][j]; AM: mean of the lower triangle with the diagonal "
                  "(CoReS). Heat-maps: versions.png.", ""]
    return "\n".join(lines)


def write_versions_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``versions.md`` and ``versions.png`` (one top-1 heat-map per complete matrix) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [v["name"] for v in results["versions"]]
    files = {"md": out / "versions.md"}
    files["md"].write_text(markdown(results))
    complete = {kind: np.array([[np.nan if v is None else v for v in row] for row in m["top1"]])
                for kind, m in results["matrices"].items() if results["scores"][kind]["top1"]["ac"] is not None}
    if complete:
        files["png"] = write_heatmap(complete, names, out / "versions.png",
                                     f"{results['meta']['dataset']}: model versions", metric="top-1")
    return files
