"""Backfilling curves: one pass over the queries for every gallery state vs one evaluate() per state.

A partly backfilled gallery mixes two embeddings of each item (transformed, re-embedded). The reference builds
each mixed gallery and calls ``evaluate`` on it, as fct-eval did before: a distance computation and a ranking per
point of every curve. ``backfill_curves`` computes each query block's distances to both galleries once and only
re-ranks per state (``evaluate_mixtures``). Both run in this process on the same data; the script checks that
they give identical numbers and prints the ratio.

    OMP_NUM_THREADS=2 python bench/bench_backfill.py                    # N = 10,000, 10 classes, 22 points
    python bench/bench_backfill.py --n 50000 --classes 100 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fct_lightning.backfill import (
    METRICS,
    BackfillContext,
    backfill_count,
    backfill_curves,
    get_policy,
)
from fct_lightning.retrieval import evaluate


def make_context(n: int, d: int, classes: int, device: str) -> BackfillContext:
    """Class clusters in the new space; the transformed gallery is the new one plus per-item noise of known size."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=gen)
    new = torch.randn(classes, d, generator=gen)[labels] + 1.5 * torch.randn(n, d, generator=gen)
    scale = torch.exp(torch.empty(n).uniform_(np.log(0.1), np.log(3.0), generator=gen))
    transformed = new + scale[:, None] * torch.randn(n, d, generator=gen)
    return BackfillContext(transformed.to(device), new.to(device), labels.to(device), torch.log(scale**2).to(device))


def reference(ctx: BackfillContext, policies: list[str], seeds: tuple[int, ...], points: int) -> dict:
    """One evaluate() per point of every order (the two end points once), averaged over seeds like fct-eval."""
    fractions = np.linspace(0.0, 1.0, points)
    ends: dict[int, dict[str, float]] = {}
    out = {}
    for name in policies:
        policy = get_policy(name)
        runs = []
        for seed in seeds if policy.stochastic else seeds[:1]:
            order = policy.order(ctx, seed)
            curve = []
            for f in fractions:
                k = backfill_count(float(f), ctx.n)
                if k in ends:
                    curve.append(ends[k])
                    continue
                mixed = ctx.gallery_transformed.clone()
                mixed[order[:k]] = ctx.gallery_new[order[:k]]
                r = evaluate(ctx.gallery_new, ctx.labels, mixed, ctx.labels, exclude_self=True)
                if k in (0, ctx.n):
                    ends[k] = r
                curve.append(r)
            runs.append(curve)
        out[name] = {m: [float(v) for v in np.mean([[r[m] for r in c] for c in runs], axis=0)] for m in METRICS}
    return out


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="gallery size (= query count, leave-one-out)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--points", type=int, default=22)
    p.add_argument("--seeds", type=int, default=3, help="random orders averaged")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    ctx = make_context(args.n, args.dim, args.classes, args.device)
    policies, seeds = ["random", "uncertainty", "distance"], tuple(range(args.seeds))
    states = 2 + (args.seeds + 2) * sum(0 < backfill_count(f, args.n) < args.n
                                        for f in np.linspace(0, 1, args.points))
    ref, t_ref = timed(lambda: reference(ctx, policies, seeds, args.points), args.device)
    new, t_new = timed(lambda: backfill_curves(ctx, policies, seeds=seeds, points=args.points), args.device)
    same = all(new[p]["curves"][m] == ref[p][m] for p in policies for m in METRICS)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"N = {args.n:,}, d = {args.dim}, {args.classes} classes, {args.points} points, policies {policies} "
          f"({args.seeds} random seeds): {states} gallery states, {where}")
    print("| method | seconds | per state | speed-up |")
    print("|---|---|---|---|")
    print(f"| one evaluate() per state (reference) | {t_ref:.2f} | {t_ref / states:.3f} | 1.00x |")
    print(f"| backfill_curves (one pass, evaluate_mixtures) | {t_new:.2f} | {t_new / states:.3f} | "
          f"{t_ref / t_new:.2f}x |")
    print(f"identical curves: {same}")
    if not same:
        raise SystemExit("the one-pass curves differ from the reference")
    for name in policies:
        print(f"  {name}: AUC(mean) top-1 {new[name]['auc_mean']['top1']:.4f}, mAP {new[name]['auc_mean']['map']:.4f}")


if __name__ == "__main__":
    main()
