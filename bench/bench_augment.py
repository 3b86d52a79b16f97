"""Batched in-memory augmentation (``fct_lightning.data.memory.augment_batch``): time per batch, per family.

With ``--ref REV`` the same batches also go through ``memory.py`` as it was at git revision ``REV``, loaded in
this process, and the ratio reference / current is printed next to each row (the machines are noisy: only
ratios from one process compare). Both implementations draw from generators seeded alike, so the largest
difference between their outputs is printed too.

    OMP_NUM_THREADS=1 python bench/bench_augment.py --ref HEAD~1
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fct_lightning.data import memory

# family, strong, stored side, output side, channels: the shipped in-memory pipelines
CASES = [
    ("cifar", False, 32, 32, 3),
    ("cifar", True, 32, 32, 3),
    ("imagenet", False, 73, 64, 3),
    ("imagenet", True, 73, 64, 3),
    ("digits", True, 8, 8, 1),
]


def load_revision(rev: str):
    """``fct_lightning.data.memory`` as it was at git revision ``rev``, as a separate module."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:src/fct_lightning/data/memory.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "memory_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("memory_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_ms(fn, repeats: int, dev: torch.device) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median of each is printed")
    p.add_argument("--ref", default=None, help="git revision whose memory.py is the reference")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    ref = load_revision(args.ref) if args.ref else None
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}, batch {args.batch}")
    print("| family | strong | stored -> out | current ms | reference ms | reference / current | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for family, strong, stored, out, channels in CASES:
        x = torch.randint(0, 256, (args.batch, channels, stored, stored), dtype=torch.uint8, device=dev)
        impls = {"current": memory} | ({"reference": ref} if ref else {})
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(args.rounds):
            for name, mod in impls.items():
                gen = torch.Generator(device=dev).manual_seed(0)
                call = functools.partial(mod.augment_batch, x, family, strong, out, gen)
                times[name].append(time_ms(call, args.repeats, dev))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        row = f"| {family} | {strong} | {stored} -> {out} | {med['current']:.2f} |"
        if ref:
            a = memory.augment_batch(x, family, strong, out, torch.Generator(device=dev).manual_seed(1))
            b = ref.augment_batch(x, family, strong, out, torch.Generator(device=dev).manual_seed(1))
            row += f" {med['reference']:.2f} | {med['reference'] / med['current']:.2f}x | {(a - b).abs().max():.1e} |"
        else:
            row += " | | |"
        print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
