"""Compatibility across model versions: the matrix M, its AC and AM, and negative / positive flips.

* ``M[i][j]`` is a retrieval metric of version ``i``'s queries against version ``j``'s gallery (for a model update
  with transformations: version ``i``'s queries against the gallery of version ``j`` as the system holds it).
* AC (CoReS, Biondi et al., TPAMI 2023; iamcl2r's ``compute_ac``): the share of the ``K (K - 1) / 2`` pairs ``i > j``
  that meet the empirical compatibility criterion ``M[i][j] > M[j][j]`` (a newer model searching an older gallery
  beats that gallery's own model).
* AM: the mean of the lower triangle with the diagonal, ``2 / (K (K + 1)) sum_{j <= i} M[i][j]``.
* Negative flips (Yan et al., CVPR 2021): the share of queries that the reference system (``old/old``) answered
  right at top-1 and the updated one answers wrong; positive flips the converse. A product is judged on the first.

Pure functions of numbers or per-query correctness; :func:`compatibility_matrix` evaluates embeddings with the
exact evaluation of :mod:`fct_lightning.retrieval.evaluate`, and :func:`write_heatmap` draws M (matplotlib).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .evaluate import evaluate_queries
from .metrics import QueryMetrics, summarize

__all__ = ["ac", "am", "compatibility_matrix", "flips", "top1_correct", "write_heatmap"]


def _square(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"a compatibility matrix is square [K, K] (K versions), got shape {m.shape}")
    low = m[np.tril_indices(len(m))]
    if not np.isfinite(low).all():
        raise ValueError("the lower triangle and diagonal of the compatibility matrix must be finite numbers (the "
                         "upper triangle, newer galleries searched by older queries, is not used and may be NaN)")
    return m


def ac(matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """AC: the share of pairs ``i > j`` with ``M[i][j] > M[j][j]``; needs ``K >= 2`` versions.

    Example:
        >>> ac([[0.5, float("nan")], [0.6, 0.7]])
        1.0
    """
    m = _square(matrix)
    k = len(m)
    if k < 2:
        raise ValueError("AC compares versions: the matrix needs at least 2 (K >= 2)")
    i, j = np.tril_indices(k, -1)
    return float(np.mean(m[i, j] > m[j, j]))


def am(matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """AM: the mean of ``M[i][j]`` over ``j <= i`` (lower triangle with the diagonal).

    Example:
        >>> round(am([[0.5, float("nan")], [0.6, 0.7]]), 4)
        0.6
    """
    m = _square(matrix)
    return float(np.mean(m[np.tril_indices(len(m))]))


def top1_correct(results: QueryMetrics) -> Tensor:
    """Per query, whether its first result is relevant (``first_rank == 1``): bool ``[Q]`` (or ``[S, Q]``)."""
    return results.first_rank == 1


def flips(reference_correct: Tensor | np.ndarray, correct: Tensor | np.ndarray) -> tuple[float, float]:
    """``(negative, positive)`` flip rates of an updated system against a reference, over the same queries.

    Args:
        reference_correct: Bool ``[Q]``: the reference system's top-1 is right (e.g. ``old/old``).
        correct: Bool ``[Q]`` (or ``[S, Q]``, one row per system state) for the updated system.

    Returns:
        Shares of all queries: right before and wrong after (negative), wrong before and right after (positive);
        python floats, or lists of them for ``[S, Q]`` input.

    Example:
        >>> flips(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]))
        (0.25, 0.25)
    """
    ref = torch.as_tensor(np.asarray(reference_correct) if not isinstance(reference_correct, Tensor)
                          else reference_correct).bool().cpu()
    cur = torch.as_tensor(np.asarray(correct) if not isinstance(correct, Tensor) else correct).bool().cpu()
    if ref.ndim != 1 or cur.shape[-1] != ref.shape[0] or cur.ndim not in (1, 2):
        raise ValueError(f"reference_correct must be [Q] and correct [Q] or [S, Q] over the same queries, got "
                         f"{tuple(ref.shape)} and {tuple(cur.shape)}")
    n = max(1, ref.shape[0])
    neg = (ref & ~cur).sum(-1).double() / n
    pos = (~ref & cur).sum(-1).double() / n
    if cur.ndim == 1:
        return float(neg), float(pos)
    return [float(v) for v in neg], [float(v) for v in pos]  # type: ignore[return-value]


def compatibility_matrix(queries: Sequence[Tensor], galleries: Sequence[Tensor], labels: Tensor, *,
                         metric: str = "top1", distance: str = "l2", exclude_self: bool = True,
                         gallery_labels: Tensor | None = None, full: bool = False) -> np.ndarray:
    """``M[i][j]`` = ``metric`` of ``queries[i]`` against ``galleries[j]`` (exact, leave-one-out by default).

    Args:
        queries: Per version ``i``, its query embeddings ``[Q, d_i]`` (version ``i``'s model).
        galleries: Per version ``j``, its gallery ``[G, d]`` in the space version ``j``'s queries search (for
            ``i > j`` the gallery must be in version ``i``'s space, e.g. transformed; pass the transformed one,
            or equal dimensions): ``galleries[j]`` is searched by every ``queries[i]``, ``i >= j``.
        labels: Query labels ``[Q]`` (and gallery labels unless ``gallery_labels``).
        metric: ``top1``, ``top5``, ``map`` or ``map@r``.
        distance: ``l2`` or ``cosine``.
        exclude_self: Query ``i`` is gallery item ``i`` (leave-one-out).
        gallery_labels: Gallery labels ``[G]`` when the queries are another set.
        full: Also evaluate the upper triangle (old queries against newer galleries); else it is NaN.

    Returns:
        float64 ``[K, K]``.
    """
    if len(queries) != len(galleries) or not queries:
        raise ValueError(f"one query set and one gallery per version: got {len(queries)} and {len(galleries)}")
    k = len(queries)
    out = np.full((k, k), np.nan)
    g_labels = labels if gallery_labels is None else gallery_labels
    for i in range(k):
        for j in range(k if full else i + 1):
            per = evaluate_queries(queries[i], labels, galleries[j], g_labels, exclude_self=exclude_self,
                                   distance=distance)
            got = summarize(per, (1, 5), map_at_r=True)
            if metric not in got:
                raise ValueError(f"metric={metric!r} is not one of {sorted(got)}")
            out[i, j] = got[metric]
    return out


def write_heatmap(matrices: Mapping[str, Sequence[Sequence[float]] | np.ndarray] | np.ndarray,
                  versions: Sequence[str], path: str | Path, title: str = "compatibility",
                  metric: str = "top-1") -> Path:
    """Draw one or more matrices ``M`` side by side (percent; rows = query version, columns = gallery version),
    each titled with its name, AC and AM; ``matrices`` is one matrix or ``{name: matrix}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = {"": matrices} if isinstance(matrices, np.ndarray | list | tuple) else dict(matrices)
    shown = {name: 100 * _square(m) for name, m in named.items()}
    if not shown or any(len(versions) != len(m) for m in shown.values()):
        raise ValueError(f"{len(versions)} version names for matrices of sizes {[len(m) for m in shown.values()]}")
    k = len(versions)
    fig, axes = plt.subplots(1, len(shown), figsize=(len(shown) * (1.0 * k + 2.2), 1.0 * k + 2.0), squeeze=False)
    low = min(float(np.nanmin(m)) for m in shown.values())
    high = max(float(np.nanmax(m)) for m in shown.values())
    for ax, (name, m) in zip(axes[0], shown.items(), strict=True):
        image = ax.imshow(m, cmap="viridis", vmin=low, vmax=high)
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < (low + high) / 2 else "k")
        ax.set_xticks(range(k), versions, rotation=30, ha="right")
        ax.set_yticks(range(k), versions)
        ax.set_xlabel("gallery")
        ax.set_ylabel("query")
        scores = f"AM {am(m / 100) * 100:.1f}" + (f", AC {ac(m):.2f}" if k > 1 else "")
        ax.set_title(f"{name}\n{scores}" if name else scores, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label=f"{metric} (%)")
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
