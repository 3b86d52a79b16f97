"""Retrieval grids: what a user of the search sees, for a few fixed queries, before and after the update.

One row per (query, case): the query image, then its top-k gallery images under ``old/old``, ``new/old``,
``fct+side/old`` and ``new/new`` (those evaluated) and, after fct-eval's backfilling curves, under the gallery partly
backfilled (``new/fct+side, 10% backfilled (uncertainty)``: :func:`fct_lightning.backfill.backfilled_gallery`), each
framed green when it is of the query's class and red when not. The queries are fixed (the first item of each of the
first classes of the split), so grids of two runs show the same images. fct-eval writes ``<results>-grid.png`` next to
its results; the report shows it, and W&B gets the picture and a table of the same images
(:func:`fct_lightning.loggers.grid_table`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


def displayable(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` (normalised) -> ``[H, W, 3]`` in [0, 1], each image stretched to its own range."""
    x = image.numpy()
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
    x = np.transpose(x, (1, 2, 0))
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, :3]


@dataclass(frozen=True)
class Grid:
    """What a grid shows: for each query row, one line per case of ``hits`` (``{case: [len(queries), k]}`` gallery
    rows), with the ``images`` of every row named (``{row: [C, H, W]}``) and the split's ``labels``."""

    queries: list[int]
    hits: dict[str, Tensor]
    labels: Tensor
    images: dict[int, Tensor]
    class_names: Sequence[str] | None = None

    @property
    def k(self) -> int:
        return int(next(iter(self.hits.values())).shape[1])

    def class_name(self, row: int) -> str:
        label = int(self.labels[row])
        return self.class_names[label] if self.class_names else str(label)

    def lines(self) -> Iterator[tuple[int, str, list[int]]]:
        """``(query row, case, its top-k gallery rows)`` in drawing order: per query, every case."""
        for qi, q in enumerate(self.queries):
            for case, hits in self.hits.items():
                yield q, case, hits[qi].tolist()

    def same_class(self, query: int, row: int) -> bool:
        return int(self.labels[row]) == int(self.labels[query])


def build_grid(embeddings: Mapping[str, Tensor], labels: Tensor, case_spaces: Mapping[str, tuple[str, str]],
               loader: Iterable, queries: int = 6, k: int = 5, distance: str = "l2",
               extra: Mapping[str, tuple[Tensor, Tensor]] | None = None,
               class_names: Sequence[str] | None = None) -> Grid | None:
    """The grid of the :data:`GRID_CASES` among ``case_spaces`` (``{case: (query space, gallery space)}``) whose
    spaces are in ``embeddings``, then the ``extra`` cases (``{case: (query embeddings, gallery embeddings)}``, e.g. a
    partly backfilled gallery), leave-one-out over one split; None when there is no case to show."""
    shown = {c: (embeddings[case_spaces[c][0]], embeddings[case_spaces[c][1]]) for c in GRID_CASES
             if c in case_spaces and all(s in embeddings for s in case_spaces[c])}
    shown.update(extra or {})
    if not shown or queries < 1:
        return None
    labels = labels.cpu()
    rows = grid_queries(labels, queries)
    hits = {c: top_hits(q.cpu(), g.cpu(), rows, k, True, distance) for c, (q, g) in shown.items()}
    needed = set(rows) | {int(r) for h in hits.values() for r in h.flatten().tolist()}
    return Grid(rows, hits, labels, collect_images(loader, needed), class_names)


def draw_grid(grid: Grid, path: str | Path, title: str = "") -> Path:
    """Draw ``grid`` to the image file ``path``: a line per (query, case), the query then its top-k, each hit framed
    green when it is of the query's class and red when not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, cases = grid.k, list(grid.hits)
    rows = len(grid.queries) * len(cases)
    height = 1.25 * rows + 0.6
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.25 * (k + 1) + 1.2, height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.9 / height)  # the title just above the first row, however many rows
    for r, (q, case, hits) in enumerate(grid.lines()):
        first = r % len(cases) == 0
        ax = axes[r][0]
        ax.imshow(displayable(grid.images[q]))
        ax.set_ylabel(case.replace(", ", ",\n"), rotation=0, ha="right", va="center", fontsize=8)
        if first:
            ax.set_title(f"query: {grid.class_name(q)}", fontsize=8)
        for j, g in enumerate(hits):
            ax = axes[r][j + 1]
            ax.imshow(displayable(grid.images[g]))
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if grid.same_class(q, g) else "tab:red")
                side.set_linewidth(3)
            if r == 0:
                ax.set_title(f"top-{j + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")  # above the top-k titles, any height
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
