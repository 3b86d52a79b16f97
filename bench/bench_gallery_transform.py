"""fct-transform on a large stored gallery: rows per second, streamed through memory-mapped files, against h applied
to the whole gallery held in memory (the reference, same process, same h).

    python bench/bench_gallery_transform.py                      # 200,000 rows, the default h (5.7M parameters)
    python bench/bench_gallery_transform.py --rows 1000000 --device cuda

The reference loads the whole gallery into memory; the streamed path reads and writes ``--batch_size`` rows at a
time through memory-mapped files, which the operating system pages in and out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fct_lightning.gallery import transform
from fct_lightning.models.transformation import Transformation


def fake_checkpoint(path: Path, h: Transformation) -> None:
    """A transformation checkpoint as fct-fit writes it (h's weights only), for a randomly initialised h."""
    torch.save({"state_dict": {f"h.{k}": v for k, v in h.state_dict().items()},
                "hyper_parameters": {"mixer_width": 2048, "mixer_depth": 2, "branch_width_factor": 2},
                "fct": {"stage": "transformation", "dataset": "bench"}}, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    h = Transformation(args.dim, args.dim, args.dim).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        old, side = tmp / "old.npy", tmp / "side.npy"
        np.save(old, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        np.save(side, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        ckpt = tmp / "h.ckpt"
        fake_checkpoint(ckpt, h)
        dev = torch.device(args.device)
        h.to(dev)

        def reference() -> np.ndarray:
            o, s = torch.from_numpy(np.load(old)), torch.from_numpy(np.load(side))
            with torch.no_grad():
                out = h.transform_stored(o, s, args.batch_size, out_device="cpu")[0]
            return out.numpy()

        timings: dict[str, list[float]] = {"in memory": [], "streamed (fct-transform)": []}
        for rep in range(2):  # ABAB: the machine's load moves between runs
            t = time.perf_counter()
            ref = reference()
            timings["in memory"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = transform(ckpt, old, tmp / f"out{rep}.npy", side=side, batch_size=args.batch_size,
                            device=args.device)
            timings["streamed (fct-transform)"].append(time.perf_counter() - t)
        diff = float(np.abs(np.load(out) - ref).max())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.rows:,} rows x {args.dim}-d, h with side-info (mixer 2048), batch {args.batch_size:,}, {name}")
    print("| path | seconds (best of 2) | rows/s | vs in memory |")
    print("|---|---|---|---|")
    base = min(timings["in memory"])
    for path, ts in timings.items():
        print(f"| {path} | {min(ts):.2f} | {args.rows / min(ts):,.0f} | {base / min(ts):.2f}x |")
    print(f"max abs difference streamed vs in memory: {diff:.2e}")


if __name__ == "__main__":
    main()
