"""What the index metrics add to RetrievalEvaluation's epoch end: exact evaluate() vs evaluate_index() per case.

One case = leave-one-out, cross-model queries (gallery plus noise), N items x d, as the callback runs it. Prints one
line per (N, classes, index): seconds of the exact metrics, of the index metrics (build + search + re-ranking +
metrics) and their ratio, and whether the Flat numbers equal the exact ones.

    OMP_NUM_THREADS=2 python bench/bench_callback_index.py
    python bench/bench_callback_index.py --sizes 10000:10 50000:1000 --indexes Flat IVF256,Flat --device cuda
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from fct_lightning.retrieval import evaluate
from fct_lightning.retrieval.ann import evaluate_index


def make_data(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(classes, d, generator=gen)[labels] + 1.5 * torch.randn(n, d, generator=gen)
    return x + 0.3 * torch.randn(n, d, generator=gen), labels, x


def timed(fn, repeats: int) -> tuple[float, dict[str, float]]:
    best, out = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["10000:10", "10000:100"], help="N:classes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--indexes", nargs="+", default=["Flat", "IVF100,Flat"])
    p.add_argument("--nprobe", type=int, default=8, help="for IVF indexes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fct_lightning.retrieval.ann").setLevel(logging.DEBUG)  # how many queries fell back
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, d={args.dim}")
    for size in args.sizes:
        n, classes = (int(v) for v in size.split(":"))
        q, y, g = (t.to(args.device) for t in make_data(n, args.dim, classes))
        t_exact, exact = timed(lambda q=q, y=y, g=g: evaluate(q, y, g, y, exclude_self=True), args.repeats)
        for factory in args.indexes:
            nprobe = args.nprobe if factory.startswith("IVF") else None
            t_index, through = timed(lambda q=q, y=y, g=g, f=factory, p=nprobe: evaluate_index(
                q, y, g, y, factory=f, exclude_self=True, nprobe=p), args.repeats)
            same = all(through[m] == exact[m] for m in through)
            print(f"N={n} classes={classes} (R~{n // classes}) {factory:>12} nprobe={nprobe}: exact {t_exact:.2f} s, "
                  f"index {t_index:.2f} s, ratio {t_index / t_exact:.2f}; equal to exact: {same}; "
                  f"top1 {through['top1']:.4f} vs {exact['top1']:.4f}, map@r {through['map@r']:.4f} vs "
                  f"{exact['map@r']:.4f}", flush=True)


if __name__ == "__main__":
    main()
