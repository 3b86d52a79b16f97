"""``fct-report``: results JSON(s) from ``fct-eval`` -> markdown and CSV tables and a PNG bar chart.

Several JSON files (one per seed) give mean and standard deviation. Cross-model cases are checked against
the compatibility criterion of Shen et al. (2020): M(new query, old gallery) > M(old, old). Each cross-model update
(a case whose queries are the new model's) is also shown as the compatibility matrix of the two versions,
``[[old/old, -], [case, new/new]]`` (top-1), with its AC and AM (CoReS) in ``report.md`` and as heat-maps in
``compat.png``; negative and positive flips against ``old/old`` (per case, and averaged over each backfilling curve's
points) follow in ``report.md`` when the results hold them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from fct_lightning import chain
from fct_lightning.retrieval.compat import ac, am, write_heatmap

log = logging.getLogger(__name__)


def _spaces_of(case: str) -> tuple[str, str] | None:
    known = {c.name: (c.query, c.gallery) for c in chain.cases()}
    return known.get(case)

METRICS = ("top1", "top5", "map", "map@r")
HEADERS = {"top1": "top-1", "top5": "top-5", "map": "mAP", "map@r": "mAP@R"}
# metrics through a FAISS index (fct-eval --index on stores), reported beside the exact ones when a result has them
INDEX_METRICS = ("index/top1", "index/top5", "index/map@r")
HEADERS.update({m: f"{HEADERS[m.split('/')[1]]} (index)" for m in INDEX_METRICS})


def columns(table: dict[str, dict[str, tuple[float, float, int]]]) -> tuple[str, ...]:
    """The exact metrics, then the index metrics that any case of ``table`` has."""
    return METRICS + tuple(m for m in INDEX_METRICS if any(m in cells for cells in table.values()))


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read results files; a clear error for a missing or malformed one."""
    runs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist; run fct-eval first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"results file {path} is not valid JSON ({err}); re-run fct-eval") from err
        if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
            raise ValueError(f"results file {path} has no 'cases' table; it was not written by fct-eval")  # noqa: TRY004
        for case, metrics in data["cases"].items():
            if not isinstance(metrics, dict) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
                raise ValueError(f"results file {path}: case {case!r} is not a table of numbers ({metrics!r}); the "
                                 "file was edited or damaged: re-run fct-eval")
        if not isinstance(data.get("meta", {}), dict) or not isinstance(data.get("backfill", {}), dict):
            raise ValueError(f"results file {path}: 'meta' / 'backfill' are not tables; re-run fct-eval")  # noqa: TRY004
        if isinstance(data.get("grid"), str):  # fct-eval's retrieval grid, a file next to the results file
            data["grid"] = str(path.parent / Path(data["grid"]).name)
        runs.append(data)
    if not runs:
        raise ValueError("no results files given")
    return runs


SETTING = ("dataset", "split", "query_split", "distance", "n_items", "split_folder")
"""What must be equal in every averaged file (``split_folder``: among the files that record it)."""


def _case_models(run: dict[str, Any], case: str, spaces: tuple[str, ...] | None) -> tuple | None:
    """The content digests a case's numbers come from (None when the file does not record them all)."""
    checkpoints = run.get("meta", {}).get("checkpoints", {})
    if spaces is None:
        return None
    ids = tuple((space, checkpoints.get(space, {}).get("digest")) for space in dict.fromkeys(spaces))
    return (case, *ids) if all(d for _, d in ids) else None


def check_runs(runs: list[dict[str, Any]], paths: list[str | Path]) -> list[dict[str, Any]]:
    """The runs to average: refuse other evaluation settings, count each case of the same models once.

    A mean and standard deviation over seeds is only meaningful when every file is one evaluation setting
    (dataset, split, query split, distance, number of items) and every number comes from its own trained models.
    A case (or backfilling curve) whose models have the same content digests in two files is one chain evaluated
    more than once (e.g. ``fct-eval --cases new/new``'s ``results/eval.json`` next to ``make``'s
    ``results/seed0.json``): only the newest file's numbers are kept, with a warning, so the spread is over
    distinct chains. Returns the runs, each with the cases it contributes (a run left with none is dropped).
    """
    names = [str(p) for p in paths]
    for key in SETTING:
        pairs = [(n, run.get("meta", {}).get(key)) for n, run in zip(names, runs, strict=True)]
        if key == "split_folder":  # recorded by newer fct-eval versions: files without it are not compared
            pairs = [(n, v) for n, v in pairs if v is not None]
        if len({str(v) for _, v in pairs}) > 1:
            listed = ", ".join(f"{n}: {v}" for n, v in pairs)
            raise ValueError(f"results files disagree on the evaluation {key} ({listed}); a report averages runs of "
                             "one setting: pass only the files of one setting (fct-report FILE [FILE ...])")
    _check_backfill_grids(runs, names)

    def age(i: int) -> tuple[float, str]:
        path = Path(paths[i])
        return (path.stat().st_mtime if path.is_file() else 0.0), names[i]

    seen: dict[tuple, int] = {}  # (case, digests...) -> the newest file that has it
    dropped: dict[int, list[str]] = {}
    kept: dict[int, dict[str, Any]] = {}
    for i in sorted(range(len(runs)), key=age, reverse=True):
        run = dict(runs[i], cases=dict(runs[i]["cases"]), backfill=dict(runs[i].get("backfill", {})))
        new_digest = run.get("meta", {}).get("checkpoints", {}).get("new", {}).get("digest")
        entries = [("cases", c, _case_models(run, c, _spaces_of(c))) for c in run["cases"]]
        entries += [("backfill", b, (f"backfill {b}", curve.get("digest") or curve.get("checkpoint"), new_digest)
                     if (curve.get("digest") or curve.get("checkpoint")) and new_digest else None)
                    for b, curve in run["backfill"].items()]
        for part, name, ident in entries:
            if ident is None:
                continue
            if ident in seen:
                del run[part][name]
                dropped.setdefault(i, []).append((name, names[seen[ident]]))
            else:
                seen[ident] = i
        if run["cases"] or run["backfill"]:
            kept[i] = run
    for i, what in dropped.items():
        others = sorted({other for _, other in what})
        whole = i not in kept
        log.warning(
            "results file %s repeats %s of %s: the same checkpoints (by content digest), so one trained chain "
            "evaluated twice (e.g. `make` wrote results/seedN.json and a later fct-eval results/eval.json); counted "
            "once. Delete the extra file to silence this. For a mean over seeds, train each seed in its own folder "
            "(`make <dataset> SEED=N` trains in <ARTIFACTS>/seedN/).", names[i],
            "all the numbers" if whole else "these numbers: " + ", ".join(name for name, _ in what),
            " and ".join(others))
    return [kept[i] for i in sorted(kept)]


def _check_backfill_grids(runs: list[dict[str, Any]], names: list[str]) -> None:
    """Backfilling AUCs average only over curves of the same points and the same kind of h (a FastFill head or
    not): an AUC over 2 points is not one over 22."""
    for what in ("fractions", "source"):
        seen: dict[str, tuple[str, Any]] = {}
        for name, run in zip(names, runs, strict=True):
            for policy, curve in run.get("backfill", {}).items():
                value = curve.get(what)
                if value is None:
                    continue
                first = seen.setdefault(policy, (name, value))
                if first[1] != value:
                    was, now = ((f"{len(first[1])} points", f"{len(value)} points") if what == "fractions"
                                else (f"h from {first[1]}/", f"h from {value}/"))
                    raise ValueError(
                        f"results files disagree on the backfilling curve {policy!r}: {first[0]} has {was}, "
                        f"{name} has {now}; its AUCs would not average. Re-run fct-eval "
                        "with the same --points (and the same transformation variants) for every seed, or pass "
                        "only the files of one setting.")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{case: {metric: (mean, std, n_runs)}}`` over the runs that have the case (also backfill AUC rows)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for case, metrics in run["cases"].items():
            for k, v in metrics.items():
                rows.setdefault(case, {}).setdefault(k, []).append(float(v))
        for policy, curve in run.get("backfill", {}).items():
            for kind in ("auc_mean", "auc_trapz"):
                for k, v in curve.get(kind, {}).items():
                    rows.setdefault(f"backfill {policy} ({kind[4:]} AUC)", {}).setdefault(k, []).append(float(v))
    order = {c.name: i for i, c in enumerate(chain.cases())}
    return {
        case: {k: (*mean_std(v), len(v)) for k, v in metrics.items()}
        for case, metrics in sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    }


def compatibility(table: dict[str, dict[str, tuple[float, float, int]]], case: str, metric: str) -> str:
    """``yes``/``no`` for cross-model cases (M(case) > M(old/old)), empty otherwise.

    Not judged (empty) when the case and old/old come from different numbers of runs: their means would be over
    other chains (e.g. a seed whose file lacks old/old).
    """
    if case not in {c.name for c in chain.cases() if c.cross} or "old/old" not in table or metric not in table[case] \
            or metric not in table["old/old"] or table[case][metric][2] != table["old/old"][metric][2]:
        return ""
    return "yes" if table[case][metric][0] > table["old/old"][metric][0] else "no"


def _fmt(cell: tuple[float, float, int]) -> str:
    mean, std, n = cell
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def to_markdown(table: dict[str, dict[str, tuple[float, float, int]]], title: str) -> str:
    metrics = columns(table)
    head = ["case", *(HEADERS[m] for m in metrics), "compatible (top-1)", "compatible (mAP)"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, cells in table.items():
        vals = [_fmt(cells[m]) if m in cells else "" for m in metrics]
        lines.append("| " + " | ".join([case, *vals, compatibility(table, case, "top1"),
                                       compatibility(table, case, "map")]) + " |")
    n = max((c[2] for cells in table.values() for c in cells.values()), default=0)
    lines += ["", (f"Values in percent; {n} run(s){' (mean ± std)' if n > 1 else ''}. A cross-model case is "
                   "compatible when its metric exceeds old/old's (not judged when the case and old/old come from "
                   "different numbers of runs).")]
    uneven = sorted({case for case, cells in table.items() for c in cells.values() if c[2] != n})
    if uneven:
        lines.append(f"Fewer runs than {n} for: {', '.join(uneven)}.")
    return "\n".join(lines) + "\n"


def write_csv(table: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w, metrics = csv.writer(f), columns(table)
        w.writerow(["case", *(f"{m}_{s}" for m in metrics for s in ("mean", "std")), "n_runs",
                    "compatible_top1", "compatible_map"])
        for case, cells in table.items():
            vals = [f"{cells[m][i]:.6f}" if m in cells else "" for m in metrics for i in (0, 1)]
            n = max(c[2] for c in cells.values())
            w.writerow([case, *vals, n, compatibility(table, case, "top1"), compatibility(table, case, "map")])


def plot_bars(table: dict[str, dict[str, tuple[float, float, int]]], path: Path, title: str) -> None:
    """Grouped bars (top-1 and mAP) per case, with std error bars when there are several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in table if "top1" in table[c] and not c.startswith("backfill")]
    fig, ax = plt.subplots(figsize=(1.2 * len(cases) + 2, 4))
    width = 0.38
    for j, metric in enumerate(("top1", "map")):
        xs = [i + (j - 0.5) * width for i in range(len(cases))]
        ax.bar(xs, [100 * table[c][metric][0] for c in cases], width, yerr=[100 * table[c][metric][1] for c in cases],
               label=HEADERS[metric], capsize=3)
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right")
    ax.set_ylabel("percent")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Backfilling curves (top-1 and mAP vs fraction backfilled) of every policy; False if there are none.

    Over several runs (seeds), each policy's line is the mean of the runs' curves, with their range shaded, as
    the table averages them (curves of other backfilling points than the first run's are left out).
    """
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for policy, curve in run.get("backfill", {}).items():
            if "fractions" in curve and "curves" in curve:
                by_policy.setdefault(policy, []).append(curve)
    if not by_policy:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("top1", "map"), strict=True):
        for policy, curves in by_policy.items():
            x = [100 * f for f in curves[0]["fractions"]]
            ys = [[100 * v for v in c["curves"][metric]] for c in curves if c["fractions"] == curves[0]["fractions"]]
            mean = [sum(col) / len(col) for col in zip(*ys, strict=True)]
            line = ax.plot(x, mean, label=policy if len(ys) == 1 else f"{policy} (mean of {len(ys)})")[0]
            if len(ys) > 1:
                ax.fill_between(x, [min(col) for col in zip(*ys, strict=True)],
                                [max(col) for col in zip(*ys, strict=True)],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("gallery backfilled (%)")
        ax.set_ylabel(HEADERS[metric] + " (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def update_matrices(table: dict[str, dict[str, tuple[float, float, int]]],
                    metric: str = "top1") -> dict[str, list[list[float]]]:
    """By cross-model case with new-model queries, the two-version matrix ``[[old/old, nan], [case, new/new]]``
    (means over runs); cases without ``old/old`` and ``new/new`` next to them give none."""
    out: dict[str, list[list[float]]] = {}
    ends = [table.get(c, {}).get(metric) for c in ("old/old", "new/new")]
    if None in ends:
        return out
    for c in chain.cases():
        if c.cross and c.query == "new" and metric in table.get(c.name, {}):
            out[c.name] = [[ends[0][0], math.nan], [table[c.name][metric][0], ends[1][0]]]
    return out


def flip_table(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """``{row: (negative, positive, n_runs)}`` means over runs: each case's flips against old/old, and each
    backfilling curve's flips averaged over its points (``backfill <curve>``); only the cases and curves the run
    contributes (:func:`check_runs`)."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for case, f in run.get("flips", {}).items():
            if case not in run["cases"]:  # counted in another file (check_runs)
                continue
            rows.setdefault(case, []).append((float(f["neg_flip"]), float(f["pos_flip"])))
        for name, curve in run.get("backfill", {}).items():
            f = curve.get("flips")
            if f:
                rows.setdefault(f"backfill {name}", []).append(
                    (sum(f["neg_flip"]) / len(f["neg_flip"]), sum(f["pos_flip"]) / len(f["pos_flip"])))
    order = {c.name: i for i, c in enumerate(chain.cases())}
    return {row: (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals), len(vals))
            for row, vals in sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}


def compat_markdown(matrices: dict[str, list[list[float]]], flipped: dict[str, tuple[float, float, int]]) -> str:
    """The report's sections on compatibility matrices (AC, AM) and flips ("" when there is neither)."""
    lines = []
    if matrices:
        lines += ["", "## Compatibility matrices (top-1)", "",
                  "Versions old (0) and new (1): M[0][0] = old/old, M[1][0] = the case (new queries against the "
                  "updated old gallery), M[1][1] = new/new. AC = share of pairs i > j with M[i][j] > M[j][j]; AM = "
                  "mean of the lower triangle with the diagonal (CoReS). Heat-maps: compat.png.", "",
                  "| update | M[0][0] | M[1][0] | M[1][1] | AC | AM |", "|---|---|---|---|---|---|"]
        for case, m in matrices.items():
            lines.append(f"| {case} | {100 * m[0][0]:.1f} | {100 * m[1][0]:.1f} | {100 * m[1][1]:.1f} | "
                         f"{ac(m):.2f} | {100 * am(m):.1f} |")
    if flipped:
        lines += ["", "## Flips against old/old (top-1)", "",
                  "Negative: share of queries right with old/old and wrong after the update; positive: the converse "
                  "(percent; backfilling curves: the mean over their points).", "",
                  "| case | negative flips | positive flips | runs |", "|---|---|---|---|"]
        lines += [f"| {row} | {100 * neg:.1f} | {100 * pos:.1f} | {n} |" for row, (neg, pos, n) in flipped.items()]
    return "\n".join(lines) + ("\n" if lines else "")


def select_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """The results files' runs to average (see :func:`check_runs`)."""
    return check_runs(load_results(paths), paths)


def make_report(paths: list[str | Path], out_dir: str | Path, title: str = "Compatibility report") -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report.png`` (and ``backfill.png``, ``compat.png``) into ``out_dir``."""
    return write_report(select_runs(paths), out_dir, title)


def write_report(runs: list[dict[str, Any]], out_dir: str | Path, title: str,
                 table: dict[str, dict[str, tuple[float, float, int]]] | None = None) -> dict[str, Path]:
    """Write the report files; ``table`` is ``aggregate(runs)`` when the caller already has it. The markdown ends with
    ``versions/versions.md`` of ``out_dir`` (fct-versions' compatibility matrices) when there is one."""
    table = aggregate(runs) if table is None else table
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    matrices = update_matrices(table)
    grids = [Path(r["grid"]) for r in runs if r.get("grid") and Path(r["grid"]).is_file()]
    grid_text = ""
    if grids:
        try:
            where = grids[0].resolve().relative_to(out.resolve())
        except ValueError:
            where = grids[0].resolve()
        grid_text = f"\n## Retrieval grid\n\nTop-5 of fixed queries, green = same class: ![retrieval grid]({where})\n"
    versions = out / "versions" / "versions.md"  # fct-versions' chain of model versions, when it was run
    versions_text = "\n" + versions.read_text().replace("versions.png", "versions/versions.png") if versions.is_file() \
        else ""
    files["md"].write_text(to_markdown(table, title) + compat_markdown(matrices, flip_table(runs)) + grid_text
                           + versions_text)
    write_csv(table, files["csv"])
    plot_bars(table, files["png"], title)
    if matrices:
        files["compat"] = write_heatmap(matrices, ["old", "new"], out / "compat.png", title + ": compatibility")
    if plot_curves(runs, out / "backfill.png", title + ": backfilling"):
        files["backfill"] = out / "backfill.png"
    return files
