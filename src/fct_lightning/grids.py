"""Retrieval grids: what a user of the search sees, for a few fixed queries, before and after the update.

One row per (query, case): the query image, then its top-k gallery images under ``old/old``, ``new/old``,
``fct+side/old`` and ``new/new`` (those evaluated), each framed green when it is of the query's class and red when
not. The queries are fixed (the first item of each of the first classes of the split), so grids of two runs show the
same images. fct-eval writes ``<results>-grid.png`` next to its results; the report and W&B show it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: the cases a grid shows, in order, where they were evaluated
GRID_CASES = ("old/old", "new/old", "fct+side/old", "new/new")


def grid_queries(labels: Tensor, n: int) -> list[int]:
    """The first item of each of the first ``n`` classes (by class index) of ``labels``: fixed queries."""
    first: dict[int, int] = {}
    for row, label in enumerate(labels.tolist()):
        first.setdefault(int(label), row)
    return [first[c] for c in sorted(first)[:n]]


def top_hits(query: Tensor, gallery: Tensor, rows: Sequence[int], k: int, exclude_self: bool = True,
             distance: str = "l2") -> Tensor:
    """Gallery rows of the ``k`` nearest neighbours of the queries ``query[rows]`` (ties by gallery row), ``[len(rows),
    k]``; ``exclude_self`` leaves gallery row ``r`` out for query ``r`` (leave-one-out)."""
    q, g = query[list(rows)].double(), gallery.double()
    if distance == "cosine":
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    d = torch.cdist(q, g)
    if exclude_self:
        d[torch.arange(len(rows)), torch.as_tensor(list(rows))] = float("inf")
    order = torch.sort(d, dim=1, stable=True).indices  # stable: equal distances keep the gallery order
    return order[:, :k].cpu()


def collect_images(loader: Iterable, rows: set[int]) -> dict[int, Tensor]:
    """The images of the given item rows from a loader of ``(images, labels, indices)`` batches (one pass)."""
    found: dict[int, Tensor] = {}
    for images, _, idx in loader:
        for pos, row in enumerate(idx.tolist()):
            if row in rows:
                found[row] = images[pos].detach().float().cpu()
        if len(found) == len(rows):
            break
    return found


def _displayable(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` (normalised) -> ``[H, W, 3]`` in [0, 1], each image stretched to its own range."""
    x = image.numpy()
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
    x = np.transpose(x, (1, 2, 0))
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, :3]


def draw_grid(hits: Mapping[str, Tensor], queries: Sequence[int], labels: Tensor,
              image: Callable[[int], Tensor], path: str | Path, title: str = "",
              class_names: Sequence[str] | None = None) -> Path:
    """Draw the grid: for each query, one row per case of ``hits`` (``{case: [len(queries), k]}`` gallery rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(hits)
    k = next(iter(hits.values())).shape[1]
    rows = len(queries) * len(cases)
    height = 1.25 * rows + 0.6
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.25 * (k + 1) + 1.2, height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.9 / height)  # the title just above the first row, however many rows
    name = (lambda c: class_names[c]) if class_names else str
    for qi, q in enumerate(queries):
        for ci, case in enumerate(cases):
            r = qi * len(cases) + ci
            ax = axes[r][0]
            ax.imshow(_displayable(image(q)))
            ax.set_ylabel(case, rotation=0, ha="right", va="center", fontsize=8)
            if ci == 0:
                ax.set_title(f"query: {name(int(labels[q]))}", fontsize=8)
            for j, g in enumerate(hits[case][qi].tolist()):
                ax = axes[r][j + 1]
                ax.imshow(_displayable(image(g)))
                right = int(labels[g]) == int(labels[q])
                for side in ax.spines.values():
                    side.set_edgecolor("tab:green" if right else "tab:red")
                    side.set_linewidth(3)
                if qi == 0 and ci == 0:
                    ax.set_title(f"top-{j + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def retrieval_grid(embeddings: Mapping[str, Tensor], labels: Tensor, case_spaces: Mapping[str, tuple[str, str]],
                   loader: Iterable, path: str | Path, queries: int = 6, k: int = 5, distance: str = "l2",
                   title: str = "", class_names: Sequence[str] | None = None) -> Path | None:
    """Write the grid of the :data:`GRID_CASES` among ``case_spaces`` (``{case: (query space, gallery space)}``)
    whose spaces are in ``embeddings`` (leave-one-out over one split); None when none of them is."""
    shown = {c: case_spaces[c] for c in GRID_CASES if c in case_spaces
             and all(s in embeddings for s in case_spaces[c])}
    if not shown or queries < 1:
        return None
    rows = grid_queries(labels.cpu(), queries)
    hits = {c: top_hits(embeddings[q].cpu(), embeddings[g].cpu(), rows, k, True, distance)
            for c, (q, g) in shown.items()}
    needed = set(rows) | {int(r) for h in hits.values() for r in h.flatten().tolist()}
    images = collect_images(loader, needed)
    return draw_grid(hits, rows, labels.cpu(), images.__getitem__, path, title, class_names)
