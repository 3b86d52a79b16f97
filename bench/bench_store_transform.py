"""fct-transform on a store: end-to-end rows/s against h's own forward speed and the CPU's matmul roofline, the gain
from overlapping reading, compute and writing, peak memory, bf16 and int8; and their retrieval accuracy on digits.

    python bench/bench_store_transform.py generate --store /tmp/bench-store        # 10M rows, 128-d + 128-d, float16
    python bench/bench_store_transform.py run --store /tmp/bench-store             # the speed figures, one process
    python bench/bench_store_transform.py rss --store /tmp/bench-store --shards 1 2  # the command's own peak RSS
    python bench/bench_store_transform.py accuracy --artifacts artifacts           # fp32 / int8 / bf16 on digits

``generate`` writes a synthetic store with the store API (resumable); ``run`` measures, in one process: the fp32
matmul roofline (a large ``torch.mm``), h's forward speed on in-memory batches (fp32, int8, bf16), fct-transform
over the whole store (fp32), over one shard without and with the overlap, and over a small store in every
precision; then the process's peak RSS (VmHWM). h is the default one (mixer 2048, 5.7M parameters) with random
weights. ``accuracy`` needs a digits chain trained by fct-fit (old, side_info, new, transformation) under
``--artifacts``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct_lightning.gallery.precision import runner
from fct_lightning.gallery.store_transform import transform_store_with
from fct_lightning.models.transformation import Transformation
from fct_lightning.store import SpaceSpec, create_store, open_store, write_space

DIGESTS = {"old": "sha256:bench-old", "side_info": "sha256:bench-side"}


def generate(path: Path, rows: int, shard_rows: int, dim: int = 128) -> None:
    """A store of ``rows`` synthetic items with spaces old and side_info (``dim``-d float16), resumable."""
    t = time.perf_counter()
    store = create_store(path, (str(k) for k in range(rows)), shard_rows=shard_rows, provenance={"bench": "synthetic"})
    for k, space in enumerate(("old", "side_info")):
        spec = SpaceSpec(role=space, dim=dim, dtype="float16", checkpoint_digest=DIGESTS[space],
                         provenance={"bench": "standard normal", "seed": k})

        def produce(i: int, k: int = k) -> np.ndarray:
            rng = np.random.default_rng([k, i])
            return rng.standard_normal((store.shards[i].rows, dim), dtype=np.float32).astype(np.float16)

        write_space(store, space, spec, produce)
    print(f"{open_store(path)} written in {time.perf_counter() - t:.0f} s")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def roofline(n: int = 4096, reps: int = 5) -> float:
    """fp32 GFLOP/s of a large ``torch.mm`` (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flop_per_row(h: Transformation) -> int:
    """2 x the multiply-adds of h's Linear layers on one row (the uncertainty head aside)."""
    return 2 * sum(m.in_features * m.out_features for name, m in h.named_modules()
                   if isinstance(m, torch.nn.Linear) and not name.startswith("uncertainty_head"))


def forward_speed(h: Transformation, precision: str, batch: int, seconds: float) -> float:
    """Rows/s of h alone at ``precision`` on one in-memory float32 batch, run repeatedly for ``seconds``."""
    run = runner(h, precision, torch.device("cpu"))
    old, side = torch.randn(batch, h.old_dim), torch.randn(batch, h.side_dim)
    run(old, side)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n < 2:
        run(old, side)
        n += 1
    return n * batch / (time.perf_counter() - t)


def transform(h: Transformation, store: Path, space: str, tag: str, **kw: Any) -> tuple[float, float, Any]:
    """fct-transform into ``space`` (replaced), its rows/s and process CPU seconds per row."""
    shutil.rmtree(store / space, ignore_errors=True)
    meta = {"digest": f"sha256:bench-h-{tag}", "old_digest": DIGESTS["old"], "side_info_digest": DIGESTS["side_info"],
            "new_digest": None, "path": "random h", "dataset": "bench"}
    cpu = time.process_time()
    res = transform_store_with(h, meta, store, space, device="cpu", overwrite=True, **kw)
    return res.rows_per_s, (time.process_time() - cpu) / max(res.rows, 1), res


def run(args: argparse.Namespace) -> None:
    store = open_store(args.store)
    torch.manual_seed(0)
    h = Transformation().eval()
    params = sum(p.numel() for p in h.parameters())
    flop = flop_per_row(h)
    print(f"store {store.path}: {store.rows:,} rows in {len(store.shards)} shards; h {params / 1e6:.2f}M parameters, "
          f"{flop / 1e6:.1f} MFLOP/row; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}")
    peak = roofline()
    print(f"fp32 matmul roofline (torch.mm 4096^2): {peak:.1f} GFLOP/s -> {peak * 1e9 / flop:,.0f} rows/s for h")
    fwd = {p: forward_speed(h, p, args.batch_size, args.seconds if p != "bf16" else args.seconds / 2)
           for p in ("fp32", "int8", "bf16")}
    for p, v in fwd.items():
        print(f"h forward, in memory, {p}: {v:,.0f} rows/s ({v * flop / 1e9:.1f} GFLOP/s)")
    rows = {}
    if not args.skip_full:
        rate, cpu, res = transform(h, store.path, "bench-fp32", "fp32", batch_size=args.batch_size)
        after = forward_speed(h, "fp32", args.batch_size, args.seconds)
        rows["full"] = rate
        print(f"fct-transform fp32, whole store ({res.rows:,} rows, float32 out): {rate:,.0f} rows/s = "
              f"{rate / fwd['fp32']:.3f} of h's forward before, {rate / after:.3f} of it after ({after:,.0f} rows/s); "
              f"{rate * flop / 1e9:.1f} GFLOP/s = {rate * flop / 1e9 / peak:.2f} of the roofline; CPU "
              f"{cpu * 1e6:.0f} us/row vs forward {2e6 / fwd['fp32']:.0f} us/row x 2 threads; published "
              f"{res.published}; peak RSS so far {peak_rss_mb():,.0f} MB")
        shutil.rmtree(store.path / "bench-fp32", ignore_errors=True)
    one = (0, len(store.shards))
    serial, _, _ = transform(h, store.path, "bench-serial", "serial", shard=one, batch_size=args.batch_size,
                             overlap=False)
    overlap, _, _ = transform(h, store.path, "bench-overlap", "overlap", shard=one, batch_size=args.batch_size)
    print(f"one shard ({store.shards[0].rows:,} rows): serial {serial:,.0f} rows/s, overlapped {overlap:,.0f} rows/s: "
          f"overlap gains {overlap / serial:.3f}x")
    int8, _, res = transform(h, store.path, "bench-int8", "int8", shard=one, precision="int8",
                             batch_size=args.batch_size)
    print(f"one shard int8: {int8:,.0f} rows/s = {int8 / overlap:.2f}x fp32 end to end, "
          f"{int8 * flop / 1e9 / peak:.2f} of the fp32 roofline; error vs fp32 on the first block {res.error}")
    for space in ("bench-serial", "bench-overlap", "bench-int8"):
        shutil.rmtree(store.path / space, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        small = Path(tmp) / "small"
        generate(small, args.small_rows, args.small_rows // 2)
        for p in ("fp32", "int8", "bf16"):
            rate, _, res = transform(h, small, f"bench-{p}", p, precision=p, batch_size=args.batch_size)
            print(f"small store ({args.small_rows:,} rows) {p}: {rate:,.0f} rows/s end to end = "
                  f"{rate / fwd[p]:.3f} of h's {p} forward; error vs fp32 on the first block {res.error}")
    print(f"peak RSS of this process (VmHWM): {peak_rss_mb():,.0f} MB")


def rss(args: argparse.Namespace) -> None:
    """Peak RSS of the fct-transform command itself (a fresh process, nothing else in it) over ``--shards`` shards
    of the store; the figure does not grow with the number of shards."""
    import subprocess
    import sys

    store = open_store(args.store)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        ckpt = Path(tmp) / "h.ckpt"
        torch.manual_seed(0)
        h = Transformation().eval()
        torch.save({"state_dict": {f"h.{k}": v for k, v in h.state_dict().items()}, "hyper_parameters": {},
                    "fct": {"stage": "transformation", "dataset": "bench", "h": h.config, "old_digest": DIGESTS["old"],
                            "side_info_digest": DIGESTS["side_info"]}}, ckpt)
        for n in args.shards:
            shutil.rmtree(store.path / "bench-cli", ignore_errors=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t = time.perf_counter()
            code = ("import sys; from fct_lightning.commands.gallery import transform_main; "
                    "transform_main(sys.argv[1:])")
            subprocess.run([sys.executable, "-c", code, "--checkpoint", str(ckpt), "--store", str(store.path),
                            "--space", "bench-cli", "--device", "cpu", "--shard", f"0/{len(store.shards) // n}",
                            "--overwrite"], check=True)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            rows = sum(s.rows for s in store.shards[::len(store.shards) // n])
            print(f"fct-transform (its own process) over {n} shard(s), {rows:,} rows: {time.perf_counter() - t:.0f} s "
                  f"with start-up, peak RSS {max(peak, before) / 1024:,.0f} MB"
                  + (" (the largest child so far)" if peak == before else ""))
        shutil.rmtree(store.path / "bench-cli", ignore_errors=True)


def accuracy(args: argparse.Namespace) -> None:
    """Top-1 / mAP of new-model queries against the fp32, int8 and bf16 transformed galleries of digits' test split."""
    from fct_lightning.gallery.embed import embed
    from fct_lightning.gallery.files import read_meta
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.retrieval import evaluate
    from fct_lightning.store import import_arrays

    run_dir = Path(args.artifacts) / args.dataset
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        files = {role: embed(run_dir / role / "best.ckpt", tmp / f"{role}.npy", split=args.split, device="cpu")
                 for role in ("old", "side_info", "new")}
        store = import_arrays(tmp / "store", {"old": files["old"], "side_info": files["side_info"]},
                              shard_rows=args.acc_shard_rows, describe=read_meta)
        labels = np.concatenate([store.labels(i) for i in range(len(store.shards))])
        query = np.load(files["new"])
        ckpt = run_dir / args.variant / "best.ckpt"
        print(f"{args.dataset} {args.split}: {store.rows} items, h {ckpt}; new-model queries vs transformed gallery, "
              "leave-one-out, L2")
        print("| gallery | top-1 | top-5 | mAP | mAP@R | vs fp32 (points: top-1 / mAP) | rel. L2 error vs fp32 |")
        print("|---|---|---|---|---|---|---|")
        base = ref = None
        for p in ("fp32", "int8", "bf16"):
            transform_store(ckpt, store.path, space=f"fct+side-{p}", precision=p, device="cpu")
            st = open_store(store.path)
            gallery = np.concatenate([st.array(f"fct+side-{p}", i) for i in range(len(st.shards))])
            m = evaluate(torch.from_numpy(query), torch.from_numpy(labels), torch.from_numpy(gallery),
                         torch.from_numpy(labels), exclude_self=True)
            ref = gallery if ref is None else ref
            base = m if base is None else base
            err = np.linalg.norm(gallery - ref) / np.linalg.norm(ref)
            print(f"| {p} | {100 * m['top1']:.2f} | {100 * m['top5']:.2f} | {100 * m['map']:.2f} | "
                  f"{100 * m['map@r']:.2f} | {100 * (m['top1'] - base['top1']):+.2f} / "
                  f"{100 * (m['map'] - base['map']):+.2f} | {err:.2e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=("generate", "run", "rss", "accuracy"))
    p.add_argument("--store", type=Path, default=Path("/tmp/fct-bench-store"))
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shard_rows", type=int, default=1_000_000)
    p.add_argument("--batch_size", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=20.0, help="how long each in-memory forward measurement runs")
    p.add_argument("--small_rows", type=int, default=100_000, help="rows of the store every precision runs on")
    p.add_argument("--skip_full", action="store_true", help="leave out the run over the whole store")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="rss: how many shards each run does")
    p.add_argument("--tmp", default=None, help="where temporary stores go (default: the system's)")
    p.add_argument("--artifacts", default="artifacts", help="accuracy: the fct-fit artifacts folder")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--split", default="test")
    p.add_argument("--variant", default="transformation")
    p.add_argument("--acc_shard_rows", type=int, default=256)
    args = p.parse_args()
    if args.phase == "generate":
        generate(args.store, args.rows, args.shard_rows)
    elif args.phase == "run":
        run(args)
    elif args.phase == "rss":
        rss(args)
    else:
        accuracy(args)


if __name__ == "__main__":
    main()
