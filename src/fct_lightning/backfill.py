"""Partial backfilling (FastFill, Jaeckle et al., ICLR 2023): accuracy as gallery items are re-embedded.

The stored gallery starts as transformed embeddings h(old, side) in the new space. *Backfilling* item ``i``
replaces its transformed embedding by the new model's ``new(x_i)``; queries always use the new model. A
*policy* decides the order: at backfilled fraction ``f`` the first ``floor(f * N + 0.5)`` items of its order are
backfilled. At ``f = 0`` the curve equals the ``fct/old`` (or ``fct+side/old``) case, at ``f = 1`` it equals
``new/new``.

Policies (see :data:`POLICIES`; add your own with :func:`register_policy`):

* ``random``: a seeded random permutation; curves are averaged over several seeds.
* ``uncertainty``: most uncertain first (largest predicted log-variance of h's FastFill head): the paper's order.
* ``confident``: the same head, least uncertain first. In a partly backfilled gallery the new-model queries find the
  backfilled (new-model) items nearer than transformed ones of their class, so these items act as the gallery's
  class prototypes: items the models are sure of make good ones, items at class boundaries (the paper's first
  choices) pull in queries of other classes. Measured on the CIFAR-10 CPU recipe in docs/results.md: it raises the
  top-1 area where the paper's order lowers it; which of the two raises mAP depends on the h (side-info or not).
* ``distance``: largest ``||new - h(old)||`` first. An *oracle*: it needs every item's new embedding, i.e. the
  backfill itself, so it is an upper reference, not a deployable policy.

The result of :func:`backfill_curves` is JSON-serialisable and goes into fct-eval's results under ``"backfill"``::

    {policy: {"fractions": [...], "curves": {metric: [...]}, "auc_mean": {metric: float},
              "auc_trapz": {metric: float}, "seeds": int, "oracle": bool,
              "flips": {"neg_flip": [...], "pos_flip": [...]},
              "first": {"fraction": 0.1, "error_ratio", "misplaced", "misplaced_all"}}}

``flips`` (when the reference system's per-query top-1 correctness is given, e.g. ``old/old``'s): at each point, the
share of queries whose top-1 was right with the reference and is wrong now (negative), or the converse (positive).
``first`` says what the order backfills first (:func:`order_diagnostics`): of its first 10%, h's squared error as a
multiple of the gallery's mean, and the share of *misplaced* items (whose transformed embedding lies nearest to another
class's new embeddings: :func:`misplaced`) beside the gallery's share; averaged over seeds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fct_lightning.retrieval import evaluate_mixtures
from fct_lightning.retrieval.compat import flips, top1_correct

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "map", "map@r")
_UNCERTAINTY_HINT = "train the transformation with --model.uncertainty true"


# ----------------------------------------------------------------------------- context and policies
@dataclass(frozen=True)
class BackfillContext:
    """Everything a policy may look at, for one gallery of ``N`` items in item-index order.

    Attributes:
        gallery_transformed: Stored, transformed embeddings h(old, side), ``[N, d]``.
        gallery_new: New-model embeddings, ``[N, d]`` (only oracle policies may use them to order).
        labels: Integer labels, ``[N]``.
        uncertainty: Predicted log-variance per item, ``[N]``, or None when h has no uncertainty head.
    """

    gallery_transformed: Tensor
    gallery_new: Tensor
    labels: Tensor
    uncertainty: Tensor | None = None

    def __post_init__(self) -> None:
        t, n = self.gallery_transformed, self.gallery_new
        if t.ndim != 2 or t.shape != n.shape:
            raise ValueError(f"gallery_transformed {tuple(t.shape)} and gallery_new {tuple(n.shape)} must both be "
                             "[N, d] with the same shape (one row per gallery item, in item-index order).")
        if self.labels.shape != (t.shape[0],):
            raise ValueError(f"labels has shape {tuple(self.labels.shape)}; expected [{t.shape[0]}] (one per item).")
        u = self.uncertainty
        if u is not None and (u.shape != (t.shape[0],) or not bool(torch.isfinite(u).all())):
            raise ValueError(f"uncertainty must be a finite [N={t.shape[0]}] tensor, got shape {tuple(u.shape)}.")

    @property
    def n(self) -> int:
        """Number of gallery items."""
        return int(self.gallery_transformed.shape[0])

    @classmethod
    def from_embeddings(cls, emb: dict[str, Any]) -> BackfillContext:
        """Build from :func:`embed_for_backfill`'s ``{"transformed", "new", "labels", "uncertainty"}``."""
        return cls(emb["transformed"], emb["new"], emb["labels"], emb.get("uncertainty"))


class BackfillPolicy:
    """Base of a backfilling policy: subclass, set ``name`` (and ``oracle``/``stochastic``), implement ``order``.

    Attributes:
        name: Registry key and results-JSON key.
        oracle: True if the policy needs information a deployed system lacks (e.g. the new embeddings).
        stochastic: True if ``order`` depends on ``seed``; its curves are then averaged over seeds.
        needs_uncertainty: True if ``order`` reads ``ctx.uncertainty`` (h's FastFill head).
    """

    name: ClassVar[str] = ""
    oracle: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    needs_uncertainty: ClassVar[bool] = False

    def order(self, ctx: BackfillContext, seed: int) -> Tensor:
        """Return a permutation ``LongTensor[N]`` of item indices; the first item is backfilled first."""
        raise NotImplementedError


def _descending(score: Tensor) -> Tensor:
    """Indices by decreasing score; ties keep the lower item index first."""
    return torch.sort(score, descending=True, stable=True).indices


class RandomPolicy(BackfillPolicy):
    """A seeded uniform random order (the FastFill baseline)."""

    name, stochastic = "random", True

    def order(self, ctx: BackfillContext, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randperm(ctx.n, generator=gen).to(ctx.gallery_new.device)


def uncertainty_order(uncertainty: Tensor, most_uncertain_first: bool = True) -> Tensor:
    """Item indices by predicted log-variance, largest first (``uncertainty``) or smallest first (``confident``);
    ties keep the lower item index first. The one rule behind both policies and fct-backfill's rounds."""
    score = torch.as_tensor(uncertainty).float()
    return _descending(score if most_uncertain_first else -score)


class UncertaintyPolicy(BackfillPolicy):
    """FastFill: most uncertain first (largest predicted log-variance)."""

    name, needs_uncertainty = "uncertainty", True
    most_uncertain_first: ClassVar[bool] = True

    def order(self, ctx: BackfillContext, seed: int) -> Tensor:
        if ctx.uncertainty is None:
            raise ValueError(f"policy {self.name!r} needs per-item uncertainty, but the context has none (the "
                             f"transformation has no uncertainty head); {_UNCERTAINTY_HINT}.")
        return uncertainty_order(ctx.uncertainty, self.most_uncertain_first)


class ConfidentPolicy(UncertaintyPolicy):
    """FastFill's head read the other way: least uncertain first (see the module docstring for why)."""

    name = "confident"
    most_uncertain_first = False


class DistancePolicy(BackfillPolicy):
    """Oracle: largest transformation error ``||new - h(old)||`` first. Needs the new embeddings: not deployable."""

    name, oracle = "distance", True

    def order(self, ctx: BackfillContext, seed: int) -> Tensor:
        return _descending(torch.linalg.vector_norm(ctx.gallery_new.float() - ctx.gallery_transformed.float(), dim=1))


POLICIES: dict[str, type[BackfillPolicy]] = {}


def register_policy(cls: type[BackfillPolicy]) -> type[BackfillPolicy]:
    """Add a policy class to :data:`POLICIES` under ``cls.name`` (usable as a class decorator)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy class {cls!r} needs a non-empty string class attribute 'name'.")
    if not callable(getattr(cls, "order", None)):
        raise TypeError(f"policy class {cls!r} needs a method order(ctx, seed) -> LongTensor[N].")
    if name in POLICIES and POLICIES[name] is not cls:
        raise ValueError(f"a different policy is already registered as {name!r} ({POLICIES[name]!r}); "
                         "pick another name.")
    POLICIES[name] = cls
    return cls


for _cls in (RandomPolicy, UncertaintyPolicy, ConfidentPolicy, DistancePolicy):
    register_policy(_cls)


def get_policy(name: str) -> BackfillPolicy:
    """An instance of the registered policy ``name``."""
    if name not in POLICIES:
        raise ValueError(f"backfill policy {name!r} is not known; choose from {sorted(POLICIES)} "
                         "or add one with fct_lightning.backfill.register_policy.")
    return POLICIES[name]()


def usable_policies(policies: Sequence[str], has_uncertainty: bool) -> tuple[list[str], list[str]]:
    """``(usable, skipped)``: the policies that can order this gallery, and those that need an uncertainty it lacks
    (:attr:`BackfillPolicy.needs_uncertainty`); unknown names raise as in :func:`get_policy`."""
    usable = [p for p in policies if has_uncertainty or not get_policy(p).needs_uncertainty]
    return usable, [p for p in policies if p not in usable]


def check_order(order: Tensor, n: int, name: str = "order") -> Tensor:
    """Validate that ``order`` is a permutation of ``0..n-1``; return it as int64."""
    order = torch.as_tensor(order)
    if order.shape != (n,) or order.dtype.is_floating_point or order.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer permutation of shape [{n}], "
                         f"got {order.dtype} {tuple(order.shape)}.")
    order = order.long()
    if not torch.equal(torch.sort(order).values.cpu(), torch.arange(n)):
        raise ValueError(f"{name} must hold every item index 0..{n - 1} exactly once (a permutation).")
    return order


# ----------------------------------------------------------------------------- curves and AUC
def auc_mean(values: Sequence[float]) -> float:
    """Area under a backfilling curve as the mean over its points (FastFill's reference definition)."""
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def auc_trapz(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under a curve over backfill fractions in [0, 1] by the trapezoid rule."""
    f, v = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 1 or len(f) < 2 or np.any(np.diff(f) < 0):
        raise ValueError(f"fractions (shape {f.shape}) must be increasing and match values (shape {v.shape}), "
                         ">= 2 points.")
    return float(np.sum(np.diff(f) * (v[1:] + v[:-1]) / 2.0))


def backfill_count(fraction: float, n: int) -> int:
    """Items backfilled at ``fraction``: ``floor(fraction * n + 0.5)`` (round half up)."""
    return int(np.floor(fraction * n + 0.5))


def _fractions(points: int) -> np.ndarray:
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise ValueError(f"points={points!r} must be an integer >= 2 (fractions 0 and 1 are always included).")
    return np.linspace(0.0, 1.0, int(points))


def backfill_masks(order: Tensor, counts: Sequence[int]) -> Tensor:
    """Gallery states along one order: ``[len(counts), N]`` bool, row ``j`` True for the first ``counts[j]`` items."""
    n = order.numel()
    position = torch.empty(n, dtype=torch.long, device=order.device)
    position[order] = torch.arange(n, device=order.device)
    return position.unsqueeze(0) < torch.as_tensor(list(counts), device=order.device).unsqueeze(1)


def backfilled_gallery(ctx: BackfillContext, policy: str, fraction: float, seed: int = 0) -> Tensor:
    """The gallery after backfilling ``fraction`` of it along ``policy``'s order (``seed`` for a random one): the
    new-model embedding for the first ``backfill_count(fraction, N)`` items of the order, the transformed one for the
    rest (the state each point of the curves evaluates), ``[N, d]``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1] (the share of the gallery backfilled)")
    order = check_order(get_policy(policy).order(ctx, seed), ctx.n, f"policy {policy!r} order")
    mask = backfill_masks(order, [backfill_count(fraction, ctx.n)])[0]
    return torch.where(mask.unsqueeze(1), ctx.gallery_new, ctx.gallery_transformed)


def _curves(query_new: Tensor, query_labels: Tensor, gallery_transformed: Tensor, gallery_new: Tensor,
            gallery_labels: Tensor, orders: Sequence[Tensor], points: int, reference_correct: Tensor | None = None,
            **evaluate_kw: Any) -> list[dict[str, Any]]:
    """One curve per order, all evaluated in a single pass over the queries (:func:`evaluate_mixtures`).

    Nothing and everything backfilled are the same two galleries for every order, so they are evaluated once.
    With ``reference_correct`` (bool ``[Q]``) each curve also gets its flips against it (``"flips"``).
    """
    if gallery_transformed.shape != gallery_new.shape:
        raise ValueError(f"gallery_transformed {tuple(gallery_transformed.shape)} and gallery_new "
                         f"{tuple(gallery_new.shape)} must have the same shape [N, d].")
    n = gallery_new.shape[0]
    fractions = _fractions(points)
    counts = [backfill_count(float(f), n) for f in fractions]
    inner = [k for k in counts if 0 < k < n]
    device = gallery_new.device
    states = [torch.zeros(1, n, dtype=torch.bool, device=device), torch.ones(1, n, dtype=torch.bool, device=device)]
    states += [backfill_masks(check_order(o, n).to(device), inner) for o in orders]
    results = evaluate_mixtures(query_new, query_labels, gallery_transformed.detach(), gallery_new.detach(),
                                gallery_labels, torch.cat(states), ks=(1, 5), map_at_r=True,
                                per_query=reference_correct is not None, **evaluate_kw)
    flipped: list[tuple[float, float]] | None = None
    if reference_correct is not None:
        results, per_query = results
        neg, pos = flips(reference_correct, top1_correct(per_query))
        flipped = list(zip(neg, pos, strict=True))
        results = list(zip(results, flipped, strict=True))
    else:
        results = [(r, None) for r in results]
    ends, rest = {0: results[0], n: results[1]}, iter(results[2:])
    out = []
    for _ in orders:
        runs = [ends[k] if k in ends else next(rest) for k in counts]
        curve = {"fractions": [float(f) for f in fractions],
                 "curves": {m: [float(r[m]) for r, _ in runs] for m in METRICS}}
        if flipped is not None:
            curve["flips"] = {"neg_flip": [f[0] for _, f in runs], "pos_flip": [f[1] for _, f in runs]}
        out.append(curve)
    return out


def backfill_curve(query_new: Tensor, query_labels: Tensor, gallery_transformed: Tensor, gallery_new: Tensor,
                   gallery_labels: Tensor, order: Tensor, *, points: int = 22, exclude_self: bool = True,
                   distance: str = "l2", backend: str = "auto", chunk_size: int | None = None) -> dict[str, Any]:
    """Retrieval metrics at ``points`` evenly spaced backfill fractions in [0, 1] for one order.

    Each point is exactly :func:`~fct_lightning.retrieval.evaluate` of the partly backfilled gallery; the query
    distances to both galleries are computed once for all points (:func:`evaluate_mixtures`).

    Args:
        query_new: New-model query embeddings ``[Q, d]``.
        query_labels: Query labels ``[Q]``.
        gallery_transformed: Transformed gallery ``[N, d]`` (the state before any backfilling).
        gallery_new: New-model gallery ``[N, d]`` (what backfilling writes).
        gallery_labels: Gallery labels ``[N]``.
        order: Permutation ``[N]``; the first ``floor(f * N + 0.5)`` items are backfilled at fraction ``f``.
        points: Number of fractions, ``np.linspace(0, 1, points)``.
        exclude_self: Leave-one-out (query ``i`` is gallery item ``i``); see :func:`~fct_lightning.retrieval.evaluate`.
        distance: ``"l2"`` or ``"cosine"``.
        backend: Passed to ``evaluate_mixtures``.
        chunk_size: Passed to ``evaluate_mixtures``.

    Returns:
        ``{"fractions": [...], "curves": {metric: [...]}}`` with python floats, metrics as in :data:`METRICS`.
    """
    return _curves(query_new, query_labels, gallery_transformed, gallery_new, gallery_labels, [order], points,
                   exclude_self=exclude_self, distance=distance, backend=backend, chunk_size=chunk_size)[0]


def misplaced(ctx: BackfillContext, distance: str = "l2", chunk: int = 2048) -> Tensor:
    """Per item, True when the new-model embedding nearest to its transformed one (among the other items') is of
    another class: a stored item that new-model queries of its own class miss and those of another class find, i.e.
    one whose backfilling should help most. ``[N]`` bool."""
    t, g = ctx.gallery_transformed.float(), ctx.gallery_new.float()
    if distance == "cosine":
        t, g = torch.nn.functional.normalize(t, dim=1), torch.nn.functional.normalize(g, dim=1)
    nearest = torch.empty(ctx.n, dtype=torch.long, device=t.device)
    for start in range(0, ctx.n, chunk):
        d = torch.cdist(t[start:start + chunk], g)
        rows = torch.arange(start, min(start + chunk, ctx.n), device=t.device)
        d[rows - start, rows] = float("inf")  # the item's own new embedding is not its neighbour
        nearest[start:start + chunk] = d.argmin(dim=1)
    return ctx.labels[nearest] != ctx.labels


def transform_error(ctx: BackfillContext) -> Tensor:
    """Per item, h's squared error ``||new - h(old, side)||^2``, ``[N]``."""
    return (ctx.gallery_new.float() - ctx.gallery_transformed.float()).pow(2).sum(dim=1)


def order_diagnostics(ctx: BackfillContext, order: Tensor, fraction: float = 0.1, wrong: Tensor | None = None,
                      error: Tensor | None = None) -> dict[str, float]:
    """What ``order`` backfills first, against the whole gallery: of its first ``fraction`` items, the mean squared
    error ``||new - h(old, side)||^2`` as a multiple of the gallery's mean (1 = what a random order picks), and the
    share :func:`misplaced` beside the gallery's share. ``wrong`` (:func:`misplaced`) and ``error``
    (:func:`transform_error`) are computed when not given; give them to judge several orders of one gallery."""
    wrong = misplaced(ctx) if wrong is None else wrong
    error = transform_error(ctx) if error is None else error
    first = order[:max(1, backfill_count(fraction, ctx.n))]
    return {"fraction": float(fraction), "error_ratio": float(error[first].mean() / error.mean().clamp_min(1e-12)),
            "misplaced": float(wrong[first].float().mean()), "misplaced_all": float(wrong.float().mean())}


def backfill_curves(ctx: BackfillContext, policies: Sequence[str] = ("random", "uncertainty", "distance"), *,
                    query_new: Tensor | None = None, query_labels: Tensor | None = None,
                    seeds: Sequence[int] = (0, 1, 2), points: int = 22, exclude_self: bool | None = None,
                    distance: str = "l2", backend: str = "auto", chunk_size: int | None = None,
                    reference_correct: Tensor | None = None,
                    orders: Mapping[str, tuple[Tensor, bool]] | None = None) -> dict[str, Any]:
    """Backfilling curves and AUCs of several policies (the ``"backfill"`` entry of fct-eval's results).

    Args:
        ctx: The gallery (transformed and new embeddings, labels, optional uncertainty).
        policies: Registered policy names (see :data:`POLICIES`).
        query_new: New-model queries ``[Q, d]``; None = the gallery's own new embeddings (leave-one-out).
        query_labels: Query labels ``[Q]``; None = ``ctx.labels``. Give both query arguments or neither.
        seeds: Seeds of stochastic policies (curves averaged over them); deterministic ones run once with
            ``seeds[0]``.
        points: Number of evenly spaced fractions in [0, 1].
        exclude_self: Leave-one-out; None = True exactly when the queries are the gallery itself.
        distance: ``"l2"`` or ``"cosine"``.
        backend: Passed to ``evaluate_mixtures``.
        chunk_size: Passed to ``evaluate_mixtures``.
        reference_correct: Bool ``[Q]``: whether the reference system's top-1 (``old/old``'s) is right for each
            query (the same queries); each policy then also gets ``"flips"`` per point, averaged over seeds.
        orders: Fixed orders to evaluate beside the policies, ``{name: (permutation LongTensor[N], oracle)}``: an
            order computed elsewhere (e.g. from a score a study fitted), ``oracle`` saying whether it read what a
            deployed system lacks; each gets an entry like a deterministic policy's.

    Returns:
        ``{policy: {"fractions", "curves": {metric: [...]}, "auc_mean": {metric}, "auc_trapz": {metric},
        "seeds": int, "oracle": bool[, "flips": {"neg_flip": [...], "pos_flip": [...]}]}}`` of python
        floats/lists/ints/bools (JSON-serialisable).
    """
    if (query_new is None) != (query_labels is None):
        raise ValueError("pass query_new and query_labels together, or neither (leave-one-out on the gallery).")
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds={seeds!r} must be a non-empty sequence of integers.")
    if isinstance(policies, str) or not policies:
        raise ValueError(f"policies={policies!r} must be a non-empty list of names from {sorted(POLICIES)}.")
    instances = [get_policy(p) for p in policies]  # fail on unknown names before any work
    fixed = dict(orders or {})
    if clash := sorted(set(fixed) & set(policies)):
        raise ValueError(f"orders {clash} have the names of policies in policies={list(policies)}; rename them.")
    own = query_new is None
    q, ql = (ctx.gallery_new, ctx.labels) if own else (query_new, query_labels)
    exclude_self = own if exclude_self is None else exclude_self
    runs_orders: list[Tensor] = []  # every (policy, seed) order and every fixed one, evaluated in one pass
    entries = []  # (name, oracle, start, end) into runs_orders
    for name, policy in zip(policies, instances, strict=True):
        start = len(runs_orders)
        for seed in (seeds if policy.stochastic else seeds[:1]):
            runs_orders.append(check_order(policy.order(ctx, int(seed)), ctx.n, f"policy {name!r} order"))
        entries.append((name, bool(policy.oracle), start, len(runs_orders)))
    for name, (order, oracle) in fixed.items():
        runs_orders.append(check_order(order, ctx.n, f"order {name!r}"))
        entries.append((name, bool(oracle), len(runs_orders) - 1, len(runs_orders)))
    if reference_correct is not None and tuple(reference_correct.shape) != (len(ql),):
        raise ValueError(f"reference_correct has shape {tuple(reference_correct.shape)}; expected [{len(ql)}] (one "
                         "per query of the curves)")
    wrong, error = misplaced(ctx, distance), transform_error(ctx)  # per item, once for every order
    first = [order_diagnostics(ctx, o, wrong=wrong, error=error) for o in runs_orders]
    all_runs = _curves(q, ql, ctx.gallery_transformed, ctx.gallery_new, ctx.labels, runs_orders, points,
                       reference_correct=reference_correct, exclude_self=exclude_self, distance=distance,
                       backend=backend, chunk_size=chunk_size)
    out: dict[str, Any] = {}
    for name, oracle, start, end in entries:
        runs = all_runs[start:end]
        fractions = runs[0]["fractions"]
        curves = {m: [float(v) for v in np.mean([r["curves"][m] for r in runs], axis=0)] for m in METRICS}
        out[name] = {"fractions": fractions, "curves": curves,
                     "auc_mean": {m: auc_mean(curves[m]) for m in METRICS},
                     "auc_trapz": {m: auc_trapz(fractions, curves[m]) for m in METRICS},
                     "seeds": len(runs), "oracle": oracle,
                     "first": {k: float(np.mean([d[k] for d in first[start:end]])) for k in first[start]}}
        if reference_correct is not None:
            out[name]["flips"] = {k: [float(v) for v in np.mean([r["flips"][k] for r in runs], axis=0)]
                                  for k in ("neg_flip", "pos_flip")}
        log.info("backfill %s: AUC(mean) top1=%.4f map=%.4f over %d run(s); its first 10%%: h's error x%.2f the "
                 "mean, %.1f%% misplaced (all: %.1f%%)", name, out[name]["auc_mean"]["top1"],
                 out[name]["auc_mean"]["map"], len(runs), out[name]["first"]["error_ratio"],
                 100 * out[name]["first"]["misplaced"], 100 * out[name]["first"]["misplaced_all"])
    return out


# ----------------------------------------------------------------------------- embedding a transformation stage
@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _item_order(index: Tensor) -> Tensor:
    """Positions that put items in index order, keeping one row per index (drops DistributedSampler padding)."""
    index = index.long().cpu()
    if index.numel() == 0:
        raise ValueError("the loader yielded no items; check the evaluation split.")
    pos = torch.sort(index, stable=True).indices
    keep = torch.ones(len(pos), dtype=torch.bool)
    keep[1:] = index[pos[1:]] != index[pos[:-1]]
    pos = pos[keep]
    if not torch.equal(index[pos], torch.arange(len(pos))):
        raise ValueError(f"the loader's item indices are not 0..N-1 (got {len(pos)} distinct indices, max "
                         f"{int(index.max())}); evaluate a full split with (image, label, index) batches.")
    return pos


@torch.no_grad()
def embed_for_backfill(module: Any, loader: Any, device: torch.device | str) -> dict[str, Tensor | None]:
    """One pass of a transformation stage over an eval loader of ``(images, labels, index)`` batches.

    Args:
        module: A :class:`~fct_lightning.stages.transformation.TransformationModel` (already on ``device``).
        loader: Evaluation loader yielding ``(images, labels, index)``.
        device: Where to run the models.

    Returns:
        ``{"transformed": [N, d], "new": [N, d], "labels": [N], "uncertainty": [N] or None}`` in item-index order,
        on ``device`` (the backfilling curves evaluate them there); uncertainty is h's predicted log-variance
        (mean over its dims) when the module has the head.
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in ("old", "side", "new", "labels", "index")}
    side_on = bool(module.use_side_info)
    with _eval_mode(module):
        for images, labels, index in loader:
            f = module.frozen_embeddings(images.to(device, non_blocking=True))
            for key in ("old", "new") + (("side",) if side_on else ()):
                parts[key].append(f[key])
            parts["labels"].append(torch.as_tensor(labels).long().to(device))
            parts["index"].append(torch.as_tensor(index).long())
    if not parts["index"]:
        raise ValueError("the loader yielded no batches; check the evaluation split.")
    pos = _item_order(torch.cat(parts["index"])).to(device)
    got = {k: torch.cat(v)[pos] if v else None for k, v in parts.items() if k != "index"}
    return transform_features(module, got["old"], got["side"], got["new"], got["labels"])


@torch.no_grad()
def transform_features(module: Any, old: Tensor, side: Tensor | None, new: Tensor, labels: Tensor,
                       batch_size: int = 65536) -> dict[str, Tensor | None]:
    """What :func:`embed_for_backfill` returns, from stored features instead of images.

    This is how FCT updates a gallery: h maps the stored old embeddings (and side-info) into the new space; no
    image is read. ``old``, ``side`` and ``new`` are the frozen models' features of the same items, in the same
    order (``side`` is ignored by a transformation without side-info), on the module's device.
    """
    side = side if module.use_side_info else None
    if module.use_side_info and side is None:
        raise ValueError("this transformation uses side-info: pass the side-info features too")
    if not len(old) == len(new) == len(labels) or (side is not None and len(side) != len(old)):
        raise ValueError(f"features must describe the same items: old {len(old)}, new {len(new)}, "
                         f"labels {len(labels)}" + ("" if side is None else f", side-info {len(side)}"))
    pred, unc = module.h.transform_stored(old, side, batch_size, uncertainty=bool(module.uncertainty))
    return {"transformed": pred, "new": new.float(), "labels": labels.long(), "uncertainty": unc}
