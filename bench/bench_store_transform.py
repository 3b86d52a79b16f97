"""fct-transform on a store: end-to-end rows/s against h's own forward speed and the CPU's matmul roofline, the gain
from overlapping reading, compute and writing, peak memory, bf16 and int8; and their retrieval accuracy on digits.

    python bench/bench_store_transform.py generate --store /tmp/bench-store        # 10M rows, 128-d + 128-d, float16
    python bench/bench_store_transform.py run --store /tmp/bench-store             # the speed figures, one process
    python bench/bench_store_transform.py rss --store /tmp/bench-store --shards 1 2  # the command's own peak RSS
    python bench/bench_store_transform.py accuracy --artifacts artifacts           # fp32 / int8 / bf16 on digits
    python bench/bench_store_transform.py device --store /tmp/s --rows 4000000 --batch_size 65536   # on a GPU

``generate`` writes a synthetic store with the store API (resumable); ``run`` measures, in one process: the fp32
matmul roofline (a large ``torch.mm``), h's forward speed on in-memory batches (fp32, int8, bf16), fct-transform
over the whole store (fp32), over one shard without and with the overlap, and over a small store in every
precision; then the process's peak RSS (VmHWM). h is the default one (mixer 2048, 5.7M parameters) with random
weights. ``device`` measures the same on the GPU (``--device``, default ``cuda``; the store is generated when
missing): h's forward on in-memory device batches in fp32 and bf16, and fct-transform end to end over the store
(reading from disk, h on the device, writing) in bf16 and fp32, float32 and float16 output, as a fraction of that
forward speed and against issue 19's 5M rows/s target. ``accuracy`` needs a digits chain trained by fct-fit (old,
side_info, new, transformation) under ``--artifacts``.
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


def forward_speed(h: Transformation, precision: str, batch: int, seconds: float,
                  device: str = "cpu") -> tuple[float, float]:
    """h alone at ``precision`` on one in-memory float32 batch (on ``device``, where h is), run repeatedly for
    ``seconds``: ``(rows/s, process CPU microseconds per row)``. On a GPU the clock stops after a synchronise."""
    dev = torch.device(device)
    run = runner(h, precision, dev)
    old, side = torch.randn(batch, h.old_dim, device=dev), torch.randn(batch, h.side_dim, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    run(old, side)
    sync()
    n, t, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t < seconds or n < 2:
        run(old, side)
        n += 1
        if n % 16 == 0:
            sync()
    sync()
    return n * batch / (time.perf_counter() - t), (time.process_time() - cpu) / (n * batch) * 1e6


def transform(h: Transformation, store: Path, space: str, tag: str, fresh: bool = True, device: str = "cpu",
              **kw: Any) -> tuple[float, float, Any]:
    """fct-transform into ``space`` (emptied first when ``fresh``): ``(rows/s, CPU us per row, its result)``."""
    if fresh:
        shutil.rmtree(store / space, ignore_errors=True)
    meta = {"digest": f"sha256:bench-h-{tag}", "old_digest": DIGESTS["old"], "side_info_digest": DIGESTS["side_info"],
            "new_digest": None, "path": "random h", "dataset": "bench"}
    cpu = time.process_time()
    res = transform_store_with(h, meta, store, space, device=device, overwrite=True, **kw)
    return res.rows_per_s, (time.process_time() - cpu) / max(res.rows, 1) * 1e6, res


def io_seconds(store: Path, batch: int) -> tuple[float, float]:
    """Seconds to read shard 0 of old and side_info as fct-transform does (checked, to float32), and to write a
    [rows, 128] float32 shard through the store writer: the work that the overlap hides behind h."""
    from fct_lightning.gallery.store_transform import _blocks
    from fct_lightning.store import SpaceWriter

    st = open_store(store)
    t = time.perf_counter()
    for _ in _blocks(st, ["old", "side_info"], [0], batch, True):
        pass
    read = time.perf_counter() - t
    data = np.random.default_rng(0).standard_normal((st.shards[0].rows, 128), dtype=np.float32)
    shutil.rmtree(store / "bench-io", ignore_errors=True)
    t = time.perf_counter()
    with SpaceWriter(st, "bench-io", SpaceSpec(role="bench", dim=128), [0]) as writer:
        writer.write_shard(0, data)
    write = time.perf_counter() - t
    shutil.rmtree(store / "bench-io", ignore_errors=True)
    return read, write


def run(args: argparse.Namespace) -> None:
    """Each measurement next to its reference, in turns, so that other jobs' load on the machine hits both alike."""
    store = open_store(args.store)
    torch.manual_seed(0)
    h = Transformation().eval()
    params, flop = sum(p.numel() for p in h.parameters()), flop_per_row(h)
    b = args.batch_size
    print(f"store {store.path}: {store.rows:,} rows in {len(store.shards)} shards; h {params / 1e6:.2f}M parameters, "
          f"{flop / 1e6:.1f} MFLOP/row; torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}")
    print("| shard | roofline GFLOP/s | h forward rows/s (CPU us/row) | fct-transform rows/s (CPU us/row) | "
          "wall ratio | CPU ratio |")
    print("|---|---|---|---|---|---|")
    n = len(store.shards) if args.max_shards is None else min(args.max_shards, len(store.shards))
    roof, fwd, e2e = [], [], []
    for i in range(n):
        roof.append(roofline(reps=3))
        fwd.append(forward_speed(h, "fp32", b, args.seconds))
        e2e.append(transform(h, store.path, "bench-fp32", "fp32", fresh=i == 0, shard=(i, len(store.shards)),
                             batch_size=b))
        (fr, fc), (er, ec, _) = fwd[-1], e2e[-1]
        print(f"| {i} | {roof[-1]:.1f} | {fr:,.0f} ({fc:.0f}) | {er:,.0f} ({ec:.0f}) | {er / fr:.3f} | {fc / ec:.3f} |")
    rows = sum(store.shards[i].rows for i in range(n))
    wall = sum(store.shards[i].rows / e[0] for i, e in enumerate(e2e))
    wall_f = sum(store.shards[i].rows / f[0] for i, f in enumerate(fwd))
    cpu_e = sum(store.shards[i].rows * e[1] for i, e in enumerate(e2e)) / rows
    cpu_f = sum(store.shards[i].rows * f[1] for i, f in enumerate(fwd)) / rows
    best, median = max(roof), np.median([e[0] / f[0] for e, f in zip(e2e, fwd, strict=True)])
    print(f"fct-transform fp32 over {rows:,} rows (published: {e2e[-1][2].published}): {rows / wall:,.0f} rows/s; "
          f"h's forward at the same times {rows / wall_f:,.0f} rows/s: wall ratio {wall_f / wall:.3f}, CPU-time "
          f"ratio {cpu_f / cpu_e:.3f} (median of shards {median:.3f}); "
          f"roofline (best of the run) {best:.1f} GFLOP/s = {best * 1e9 / flop:,.0f} rows/s; h's forward reaches "
          f"{max(f[0] for f in fwd) * flop / 1e9:.1f} GFLOP/s at best; peak RSS so far {peak_rss_mb():,.0f} MB")
    shutil.rmtree(store.path / "bench-fp32", ignore_errors=True)
    read, write = io_seconds(store.path, b)
    compute = store.shards[0].rows / (rows / wall_f)
    print(f"per {store.shards[0].rows:,}-row shard: reading old + side_info {read:.1f} s, writing the output "
          f"{write:.1f} s, h {compute:.0f} s: the overlap hides at most {(read + write) / compute:.1%} of the run")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        small = Path(tmp) / "small"
        generate(small, args.small_rows, args.small_rows // 5)
        turns = {"serial": [], "overlapped": []}
        for _ in range(2):  # ABAB
            for name in turns:
                turns[name].append(transform(h, small, f"bench-{name}", name, overlap=name == "overlapped",
                                             batch_size=b)[0])
        print(f"small store ({args.small_rows:,} rows, shards of {args.small_rows // 5:,}), ABAB: serial "
              f"{turns['serial']}, overlapped {turns['overlapped']} rows/s: overlap gains "
              f"{sum(turns['overlapped']) / sum(turns['serial']):.3f}x")
        for p in ("fp32", "int8", "bf16"):
            fr, fc = forward_speed(h, p, b, args.seconds / (4 if p == "bf16" else 1))
            part = (0, 5) if p == "bf16" else None  # bf16 on this CPU is slow: one shard of five
            er, ec, res = transform(h, small, f"bench-{p}", p, precision=p, batch_size=b, shard=part)
            print(f"{p}: h forward {fr:,.0f} rows/s ({fc:.0f} CPU us/row), fct-transform {er:,.0f} rows/s ({ec:.0f}) "
                  f"over {res.rows:,} rows: wall ratio {er / fr:.3f}, CPU ratio {fc / ec:.3f}; x{fr / fwd[-1][0]:.2f} "
                  f"fp32's last forward; error vs fp32 on the first block {res.error}")
    print(f"peak RSS of this process (VmHWM): {peak_rss_mb():,.0f} MB")


def on_device(args: argparse.Namespace) -> None:
    """fct-transform on a GPU: h's forward on device batches, then end to end over the store, per precision and
    stored dtype, each next to the forward measured just before it."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; run the device phase on a GPU machine")
    if not (args.store / "manifest.json").is_file():
        generate(args.store, args.rows, args.shard_rows)
    store = open_store(args.store)
    torch.manual_seed(0)
    h = Transformation().eval().to(args.device)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    b = args.batch_size
    print(f"{name}, torch {torch.__version__}; store {store.path}: {store.rows:,} rows in {len(store.shards)} shards "
          f"(float16 on disk); h {sum(p.numel() for p in h.parameters()) / 1e6:.2f}M parameters, batch {b}")
    print("| precision | output dtype | h forward rows/s (device batches) | fct-transform rows/s (disk to disk) | "
          "ratio | vs 5M rows/s |")
    print("|---|---|---|---|---|---|")
    for precision, dtype in (("bf16", "float16"), ("bf16", "float32"), ("fp32", "float32")):
        fr, _ = forward_speed(h, precision, b, args.seconds, args.device)
        er, _, res = transform(h, store.path, "bench-device", f"{precision}-{dtype}", device=args.device,
                               precision=precision, dtype=dtype, batch_size=b)
        print(f"| {precision} | {dtype} | {fr:,.0f} | {er:,.0f} | {er / fr:.3f} | {er / 5e6:.2f}x |"
              + (f" error vs fp32 {res.error}" if res.error else ""))
    shutil.rmtree(store.path / "bench-device", ignore_errors=True)
    read, write = io_seconds(store.path, b)
    print(f"per {store.shards[0].rows:,}-row shard on this disk: reading old + side_info {read:.2f} s "
          f"({store.shards[0].rows / read:,.0f} rows/s), writing a float32 output {write:.2f} s "
          f"({store.shards[0].rows / write:,.0f} rows/s); peak RSS {peak_rss_mb():,.0f} MB")


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
    p.add_argument("phase", choices=("generate", "run", "rss", "accuracy", "device"))
    p.add_argument("--device", default="cuda", help="device: where h runs")
    p.add_argument("--store", type=Path, default=Path("/tmp/fct-bench-store"))
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shard_rows", type=int, default=1_000_000)
    p.add_argument("--batch_size", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=20.0, help="how long each in-memory forward measurement runs")
    p.add_argument("--small_rows", type=int, default=100_000, help="rows of the store every precision runs on")
    p.add_argument("--max_shards", type=int, default=None, help="run: transform only the first N shards")
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
    elif args.phase == "device":
        on_device(args)
    elif args.phase == "rss":
        rss(args)
    else:
        accuracy(args)


if __name__ == "__main__":
    main()
