"""fct-embed --store: images/s of its Lightning predict path (batches -> models -> StoreWriter -> shards) against a
plain ``torch.no_grad()`` loop over the same DataLoader in the same process (the same batches, the same models, the
embeddings copied back to the host; nothing written).

    python bench/bench_store_embed.py                                   # CPU: digits, ConvNet (width 32)
    python bench/bench_store_embed.py --preset resnet18-32 --images 2000
    python bench/bench_store_embed.py --preset resnet18-32 --images 100000 --num_workers 8      # on a GPU
    python bench/bench_store_embed.py --preset resnet50-224 --images 20000 --num_workers 16 --precision bf16-mixed

It runs on CUDA when there is a GPU (``--device cpu`` to force the CPU). The models are fitted for one batch by
fct-fit (speed does not depend on the weights); folder presets embed a generated folder of JPEGs (decoding is part of
both loops). Rows:

* ``plain loop``: ``for images, rows in loader: [m.query_embed(images.to(dev)).cpu() for m in models]``;
* ``predict path``: ``Trainer.predict`` with fct-embed's LightningModule, datamodule and StoreWriter into a store that
  exists (setup, the loop, shard writing with sha256 and fsync, publication);
* ``embed_store()``: the whole call into a new store (checkpoint loading, the store's creation; for a folder also
  the check that every file decodes, which reads every image once more).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from fct_lightning.commands.fit import fit
from fct_lightning.gallery.items import shard_loader
from fct_lightning.gallery.store_embed import EmbedData, ImageModels, embed_store, load_models, space_specs
from fct_lightning.gallery.writer import StoreWriter
from fct_lightning.store import open_store
from fct_lightning.store.store import write_manifest

PRESETS = {  # dataset, image size, backbone, checkpoints
    "digits": ("digits", 8, "convnet", ("old", "side_info")),
    "resnet18-32": ("folder", 32, "resnet18", ("old", "side_info")),
    "resnet50-224": ("folder", 224, "resnet50", ("old",)),
}


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> None:
    """``root/{train,val}/<class>/`` (2 images per class, for fitting) and ``root/gallery/<class>/`` (``images``)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2 * classes), ("val", 2 * classes), ("gallery", images)):
        for i in range(n):
            folder = root / split / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(px).save(folder / f"{i:07d}.jpg", quality=90)


def checkpoints(base: Path, preset: str) -> list[Path]:
    dataset, size, backbone, stages = PRESETS[preset]
    data = ["--dataset", dataset] + (["--data.root", str(base / "data"), "--data.image_size", str(size)]
                                     if dataset == "folder" else [])
    for stage in stages:
        fit(["--stage", stage, "--artifacts", str(base / "art"), *data, "--model.backbone", backbone,
             "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
             "--trainer.enable_model_summary", "false", "--data.batch_size", "16"])
    return [base / "art" / dataset / stage / "best.ckpt" for stage in stages]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="digits")
    p.add_argument("--images", type=int, default=2000, help="folder presets: gallery images to generate")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--shard_rows", type=int, default=50_000)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (the plain loop autocasts alike)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2, help="ABAB rounds (the best of each row is reported)")
    args = p.parse_args()
    dev = torch.device(args.device)
    trainer_opts = {"accelerator": "gpu" if dev.type == "cuda" else "cpu", "devices": 1, "precision": args.precision}
    dataset, size, backbone, _ = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        where = {"split": "train"} if dataset == "digits" else {"images": base / "data" / "gallery"}
        if dataset == "folder":
            make_folder(base / "data", args.images, size)
        ckpts = checkpoints(base, args.preset)
        common = {"shard_rows": args.shard_rows, "batch_size": args.batch_size, "num_workers": args.num_workers,
                  "dtype": args.dtype, "trainer": trainer_opts, **where}
        store = embed_store(ckpts, base / "warm", **common)  # warm-up; this store is then re-used without spaces
        n = open_store(store).rows
        models, items = load_models(ckpts, where.get("images"), where.get("split"), None)
        specs = space_specs(models, items, args.dtype, args.precision)
        st = open_store(store)  # as created, before any space was published
        st.manifest["spaces"] = {}
        auto = torch.autocast(dev.type, torch.bfloat16, enabled=args.precision.startswith("bf16"))

        def plain() -> None:
            loader = shard_loader(items.dataset(st), st.shards, args.batch_size, args.num_workers,
                                  pin_memory=dev.type == "cuda")
            nets = [m.to(dev).eval() for m, _ in models.values()]  # Trainer.predict hands them back on the CPU
            with torch.no_grad(), auto:
                for images, _ in loader:
                    x = images.to(dev, non_blocking=True)
                    for m in nets:
                        m.query_embed(x).cpu()

        def predict() -> None:
            for space in specs:  # an existing store, no spaces yet
                shutil.rmtree(store / space, ignore_errors=True)
            write_manifest(store, {**st.manifest, "spaces": {}})
            writer = StoreWriter(store, specs)
            data = EmbedData(items, store, writer, args.shard_rows, args.batch_size, args.num_workers)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pl.Trainer(callbacks=[writer], use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                           enable_model_summary=False, enable_progress_bar=False, **trainer_opts).predict(
                    ImageModels({r: m for r, (m, _) in models.items()}, args.dtype), datamodule=data,
                    return_predictions=False)

        rounds = [0]

        def whole() -> None:
            rounds[0] += 1
            embed_store(ckpts, base / f"new{rounds[0]}", **common)

        timings: dict[str, list[float]] = {"plain loop": [], "predict path": [], "embed_store()": []}
        for _ in range(args.repeats):
            for name, run in (("plain loop", plain), ("predict path", predict), ("embed_store()", whole)):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                run()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - t)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}: {n} images, {size} px, {backbone}, {len(specs)} model(s) ({', '.join(specs)}), "
          f"batch {args.batch_size}, {args.num_workers} workers, {args.dtype} on disk, {args.precision}; {device}")
    print("| path | best s | images/s | vs plain loop |\n|---|---|---|---|")
    base_s = min(timings["plain loop"])
    for name, ts in timings.items():
        print(f"| {name} | {min(ts):.3f} | {n / min(ts):,.0f} | {base_s / min(ts):.2f} |")


if __name__ == "__main__":
    main()
