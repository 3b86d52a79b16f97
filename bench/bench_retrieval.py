"""Benchmark exact retrieval evaluation (fct_lightning.retrieval.evaluate) against a full-matrix reference.

Each fct-lightning measurement runs in a fresh subprocess so its peak RSS is honest. The reference (full N x N
distance matrix, scikit-learn AP per query, CMC from argsort) runs at a smaller N in the same script.

    OMP_NUM_THREADS=2 python bench/bench_retrieval.py
    python bench/bench_retrieval.py --device cuda --sizes 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def make_data(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    centers = torch.randn(classes, d, generator=gen)
    return centers[labels] + 1.5 * torch.randn(n, d, generator=gen), labels


def worker(args: argparse.Namespace) -> None:
    """Time one evaluate() call and print a JSON line with time and peak RSS."""
    from fct_lightning.retrieval import evaluate

    x, y = make_data(args.n, args.dim, args.classes[0])
    dev = torch.device(args.device)
    x, y = x.to(dev), y.to(dev)
    evaluate(x[:256], y[:256], x[:256], y[:256], exclude_self=True, backend=args.backend)  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(x, y, x, y, exclude_self=True, backend=args.backend)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "cpu_seconds": time.process_time() - c0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mb": rss_before / 1024, "metrics": res}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def reference(x: np.ndarray, y: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """The reference approach: full N x N matrix, argsort, sklearn AP per query."""
    from sklearn.metrics import average_precision_score

    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x).double()).numpy()
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :-1]  # drop self (last)
    rel = y[order] == y[:, None]
    out = {f"top{k}": float(rel[:, :k].any(1).mean()) for k in ks}
    aps, aprs = [], []
    for i in range(len(x)):
        mask = np.arange(len(x)) != i
        truth = y[mask] == y[i]
        r = int(truth.sum())
        if r == 0:
            continue
        aps.append(average_precision_score(truth, -d[i, mask]))
        hits = rel[i, :r]
        aprs.append(float((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r))
    out["map"], out["map@r"] = float(np.mean(aps)), float(np.mean(aprs))
    return out


def run_worker(n: int, classes: int, args: argparse.Namespace, backend: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--classes", str(classes), "--dim", str(args.dim),
           "--device", args.device, "--backend", backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="N for leave-one-out runs")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"])
    p.add_argument("--ref-n", type=int, default=5_000, help="N for the full-matrix reference (0 to skip)")
    p.add_argument("--n", type=int, default=10_000, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, device={args.device}, d={args.dim}, "
          f"cpus={os.cpu_count()}, load average {load:.1f} (timings are wall-clock; cpu_s = process CPU time)")
    print(f"{'N':>7} {'classes':>7} {'backend':>7} {'time_s':>8} {'cpu_s':>8} {'peak_rss_mb':>11} {'top1':>7} "
          f"{'map':>7} {'map@r':>7}")
    for n in args.sizes:
        for c in args.classes:
            r = run_worker(n, c, args, args.backend)
            m = r["metrics"]
            extra = f" cuda_peak={r['peak_cuda_mb']:.0f}MB" if "peak_cuda_mb" in r else ""
            print(f"{n:>7} {c:>7} {args.backend:>7} {r['seconds']:>8.2f} {r.get('cpu_seconds', float('nan')):>8.2f} "
                  f"{r['peak_rss_mb']:>11.0f} {m['top1']:>7.4f} {m['map']:>7.4f} {m['map@r']:>7.4f}{extra}")
    if args.ref_n and args.device == "cpu":
        from fct_lightning.retrieval import evaluate

        for c in args.classes:
            x, y = make_data(args.ref_n, args.dim, c)
            t0 = time.perf_counter()
            ref = reference(x.numpy(), y.numpy())
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours = evaluate(x, y, x, y, exclude_self=True)
            t_ours = time.perf_counter() - t0
            diff = max(abs(ref[k] - ours[k]) for k in ref)
            print(f"reference N={args.ref_n} classes={c}: full-matrix+sklearn {t_ref:.2f}s, evaluate {t_ours:.3f}s, "
                  f"speedup {t_ref / t_ours:.1f}x, max |metric diff| {diff:.2e}")


if __name__ == "__main__":
    main()
