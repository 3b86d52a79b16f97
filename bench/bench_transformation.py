"""Time per epoch of h training: cached features vs on-the-fly frozen forward passes, in one process.

    python bench/bench_transformation.py [--artifacts DIR] [--dataset digits] [--epochs 3]

Uses the old/side_info/new checkpoints under ``DIR/<dataset>`` (trains quick ones in a temporary folder when
they are missing), then trains h both ways with the same settings and prints seconds per epoch and the
ratio (target: cached at least 20x faster per epoch). The one-off cache build is reported separately.

On a CPU, ResNet-18 epochs of CIFAR-10 take too long to time whole; ``--limit_batches N`` times N steps per
epoch in both modes (the same batches of the same items, so the per-epoch ratio is the per-step ratio) and
``--train_classes`` / ``--cache_views`` shrink the one-off cache build:

    python bench/bench_transformation.py --dataset cifar10 --data_root data --batch_size 256 \
        --limit_batches 4 --epochs 2 --train_classes 1 --cache_views 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from fct_lightning.callbacks import ChannelsLast, Throughput
from fct_lightning.commands.fit import fit
from fct_lightning.data import DATAMODULES
from fct_lightning.stages import TransformationModel


def ensure_chain(artifacts: Path, dataset: str, extra: list[str]) -> None:
    """Quick upstream checkpoints (2 epochs of at most 3 batches: the timing does not depend on the weights)."""
    for stage in ("old", "side_info", "new"):
        if not (artifacts / dataset / stage / "best.ckpt").is_file():
            fit(["--stage", stage, "--dataset", dataset, "--artifacts", str(artifacts), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2",
                 "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", *extra])


def time_h(artifacts: Path, dataset: str, cached: bool, epochs: int, cache_dir: Path, dm_kwargs: dict,
           limit_batches: int | None = None, cache_views: int = 10) -> dict:
    ckpt = {r: str(artifacts / dataset / r / "best.ckpt") for r in ("old", "side_info", "new")}
    model = TransformationModel(ckpt["old"], ckpt["new"], ckpt["side_info"], cached=cached, cache_dir=str(cache_dir),
                                dataset=dataset, mixer_width=2048, cache_views=cache_views)
    dm = DATAMODULES[dataset](**dm_kwargs)
    meter = Throughput(skip=0)
    epoch_times: list[float] = []

    cuda = torch.cuda.is_available()

    class EpochTimer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if cuda:
                torch.cuda.synchronize()
            epoch_times.append(time.perf_counter() - self.t)

    # on a GPU both modes get the settings of the gpu-fast preset (bf16 autocast, channels_last frozen models)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         limit_train_batches=limit_batches,
                         callbacks=[meter, EpochTimer(), *([ChannelsLast()] if cuda else [])], accelerator="auto",
                         devices=1, precision="bf16-mixed" if cuda else "32-true")
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    total = time.perf_counter() - start
    steady = epoch_times[1:] or epoch_times
    return {"epoch_s": sum(steady) / len(steady), "total_s": total, "setup_s": total - sum(epoch_times),
            "wait_share": sum(h["data_wait_share"] for h in meter.history) / max(1, len(meter.history))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", default=None)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data_root", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--limit_batches", type=int, default=None, help="time only this many steps per epoch")
    p.add_argument("--train_classes", type=int, default=None, help="train h on the first C classes only")
    p.add_argument("--cache_views", type=int, default=10)
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    tmp = Path(tempfile.mkdtemp(prefix="bench-h-"))
    artifacts = Path(args.artifacts) if args.artifacts else tmp
    dm_kwargs = {"batch_size": args.batch_size, **({"root": args.data_root} if args.data_root else {}),
                 **({"train_classes": args.train_classes} if args.train_classes else {})}
    if DATAMODULES[args.dataset].supports_in_memory:
        # batched augmentation of in-memory images (on the GPU when there is one), so the on-the-fly path is
        # timed on its frozen forward passes, not on per-item augmentation
        dm_kwargs["in_memory_gpu"] = True
    ensure_chain(artifacts, args.dataset, [f"--data.root={args.data_root}"] if args.data_root else [])
    timing = {"limit_batches": args.limit_batches, "cache_views": args.cache_views}
    cached = time_h(artifacts, args.dataset, True, args.epochs, tmp / "cache", dm_kwargs, **timing)
    onthefly = time_h(artifacts, args.dataset, False, args.epochs, tmp / "cache", dm_kwargs, **timing)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    steps = f", {args.limit_batches} steps per epoch" if args.limit_batches else ""
    print(f"h training on {args.dataset}, {dev}, batch {args.batch_size}, {args.epochs} epochs{steps}, "
          f"{args.cache_views} cached view(s)")
    print("| mode | s / epoch | one-off setup s (cache build, loading) | data-wait share |")
    print("|---|---|---|---|")
    for name, r in (("cached features", cached), ("on the fly", onthefly)):
        print(f"| {name} | {r['epoch_s']:.3f} | {r['setup_s']:.1f} | {100 * r['wait_share']:.0f}% |")
    print(f"speed-up per epoch (on-the-fly / cached): {onthefly['epoch_s'] / cached['epoch_s']:.1f}x")


if __name__ == "__main__":
    main()
