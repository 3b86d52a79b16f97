"""``fct-embed`` and ``fct-transform``: the gallery commands over :mod:`fct_lightning.gallery`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fct_lightning.commands import run_command
from fct_lightning.gallery.embed import embed
from fct_lightning.gallery.files import sidecar
from fct_lightning.gallery.transform import transform


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The options both commands share, then the parsed arguments (and INFO logging for the timings)."""
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (once the new ones are "
                   "complete)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args


def _inputs(p: argparse.ArgumentParser, checkpoint: str, out: str) -> None:
    """The model to run and the file to write, which both commands take."""
    p.add_argument("--checkpoint", required=True, help=checkpoint)
    p.add_argument("--out", required=True, help=out)


def embed_command(argv: list[str] | None = None) -> Path:
    """``fct-embed`` with ``argv``; returns the embeddings file (``--out``) or the store (``--store``) written."""

    def boolean(value: str) -> bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{value!r} is not true or false")
        return value.lower() in ("true", "1")

    def devices(value: str) -> int | str | list[int]:  # --trainer.devices: auto, a count, or indices (0,1)
        if value == "auto":
            return value
        try:
            return [int(v) for v in value.split(",") if v] if "," in value else int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a device count or list; use auto, a number (2) "
                                             "or device indices (0,1)") from None

    p = argparse.ArgumentParser(prog="fct-embed", description="Embed a split or a folder of images with stages' "
                                "image models: into a store (--store: every --checkpoint in one pass, one space per "
                                "role, on Lightning's predict loop, resumable) or one file (--out: one checkpoint; "
                                "writes OUT.npy and OUT.json).")
    p.add_argument("--checkpoint", action="append", required=True, help="an old, side_info, new or bct checkpoint "
                   "(best.ckpt); with --store, repeat it to embed several models in one pass")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--store", default=None, help="the store to write (created for these items, or resumed)")
    out.add_argument("--out", default=None, help="instead: one embeddings file to write (.npy)")
    p.add_argument("--split", default=None, help="a split of the checkpoint's dataset (default: its eval split)")
    p.add_argument("--images", default=None, help="instead: a folder of image files (searched recursively)")
    p.add_argument("--data_root", "--data.root", dest="data_root", default=None,
                   help="where the dataset is (default: the root the stage was trained with)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave out image files that cannot be decoded (listed in OUT.json, or in the store's "
                        "provenance) instead of stopping")
    store = p.add_argument_group("--store only")
    store.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
    store.add_argument("--shard_rows", type=int, default=1_000_000, help="rows per shard of a new store")
    store.add_argument("--trainer.accelerator", dest="accelerator", default="auto", help="auto, cpu, gpu, cuda, ...")
    store.add_argument("--trainer.devices", dest="devices", type=devices, default="auto",
                       help="auto, a number of devices, or a list (0,1)")
    store.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    store.add_argument("--trainer.strategy", dest="strategy", default="auto", help="auto, ddp, ...")
    store.add_argument("--trainer.precision", dest="precision", default="32-true",
                       help="32-true, bf16-mixed, 16-mixed (recorded in each space)")
    store.add_argument("--trainer.enable_progress_bar", dest="progress_bar", type=boolean, default=False)
    args = _parse(p, argv)
    store_only = {a.dest: a.option_strings[0] for a in store._group_actions}
    if args.out is not None:
        given = [flag for dest, flag in store_only.items() if getattr(args, dest) != p.get_default(dest)]
        if given:
            raise ValueError(f"{', '.join(given)} work with --store only; --out runs one model in this process "
                             "(--device)")
        if len(args.checkpoint) > 1:
            raise ValueError(f"--out writes one model's embeddings; {len(args.checkpoint)} --checkpoint were given: "
                             "use --store to embed several in one pass, or one --out per checkpoint")
        out = embed(args.checkpoint[0], args.out, args.split, args.images, args.data_root, args.batch_size,
                    args.num_workers, args.device, args.overwrite, args.skip_unreadable)
        meta = json.loads(sidecar(out, "meta").read_text())
        print(f"embeddings written to {out} ({meta['rows']} x {meta['embedding_dim']})")
        return out
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from fct_lightning.gallery.store_embed import embed_store
    from fct_lightning.store import open_store

    if args.device != "auto":
        raise ValueError(f"--device {args.device} is for --out; with --store, choose devices with "
                         "--trainer.accelerator and --trainer.devices")
    trainer = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
               "strategy": args.strategy, "precision": args.precision, "enable_progress_bar": args.progress_bar}
    path = embed_store(args.checkpoint, args.store, args.split, args.images, args.data_root, args.dtype,
                       args.shard_rows, args.batch_size, args.num_workers, args.skip_unreadable, args.overwrite,
                       trainer)
    if rank_zero_only.rank == 0:
        st = open_store(path)
        spaces = ", ".join(f"{n} ({s.dim}-d {s.dtype})" for n, s in st.spaces.items())
        print(f"store {path}: {st.rows} items in {len(st.shards)} shards; spaces {spaces}")
    return path


def transform_command(argv: list[str] | None = None) -> Path:
    """``fct-transform`` with ``argv``; returns the store (``--store``) or the transformed gallery file written."""
    from fct_lightning.gallery.precision import PRECISIONS
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.store import DTYPES

    p = argparse.ArgumentParser(prog="fct-transform", description="Map a stored gallery (old embeddings and "
                                "side-info, no images) into the new model's space with a trained transformation: "
                                "a store's shards (--store) or one .npy file (--old, --out).")
    p.add_argument("--checkpoint", required=True, help="the transformation's checkpoint (transformation/best.ckpt)")
    p.add_argument("--store", default=None, help="a store (fct-store import, fct-embed --store): its 'old' and "
                   "'side_info' spaces are transformed into --space, shard by shard, resumably")
    p.add_argument("--space", default=None, help="--store: the space to write (default fct+side, or fct for h "
                   "without side-info; a closed-form h's own: linear+side, linear or procrustes; a FastFill h also "
                   "writes <space>-uncertainty)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="--store: fp32 (default), bf16 "
                   "(autocast, GPU or CPU) or int8 (dynamic quantisation, CPU); the error against fp32 is logged")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="--store: stored dtype (default float32)")
    p.add_argument("--shard", default=None, metavar="I/N", help="--store: this job does shards I, I+N, ... "
                   "(array jobs: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; default: RANK/WORLD_SIZE under "
                   "torchrun, else all); the job finishing last publishes the space")
    p.add_argument("--out", default=None, help="the transformed gallery to write (.npy, [N, d_new]), with --old")
    p.add_argument("--old", default=None, help="the stored old-model embeddings (.npy, [N, d_old])")
    p.add_argument("--side", default=None, help="the stored side-info features (.npy, [N, d_side])")
    p.add_argument("--uncertainty_out", default=None,
                   help="FastFill: also write each item's log-variance (.npy, [N]); backfill the highest first")
    p.add_argument("--batch_size", type=int, default=8192,
                   help="rows per forward pass (h's activations: about 16 bytes x mixer width per row, "
                        "some 256 MiB at 8,192 rows and width 2,048)")
    args = _parse(p, argv)
    if (args.store is None) == (args.old is None):
        raise ValueError("give exactly one of --store STORE (transform a store's shards) or --old OLD.npy --out "
                         "OUT.npy (one file)")
    if args.store is not None:
        extra = [f"--{k}" for k in ("out", "side", "uncertainty_out") if getattr(args, k) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} belong to the one-file form (--old); with --store the inputs are "
                             "the store's old and side_info spaces and the output is --space")
        res = transform_store(args.checkpoint, args.store, args.space, args.precision or "fp32",
                              args.dtype or "float32", args.shard, args.batch_size, args.device, args.overwrite)
        unc = f", uncertainty in space {res.uncertainty_space}" if res.uncertainty_space else ""
        done = "published" if res.published else "not published yet (the job that finishes last publishes it)"
        print(f"space {res.space} of {res.store}: {len(res.written)} of this job's {len(res.shards)} shards written "
              f"({res.rows:,} rows, {res.rows_per_s:,.0f} rows/s, {res.precision}){unc}; {done}")
        return res.store
    extra = [f"--{k}" for k in ("space", "precision", "dtype", "shard") if getattr(args, k) is not None]
    if extra:
        raise ValueError(f"{', '.join(extra)} work on stores only: pass --store STORE (fct-store import --out STORE "
                         "--space old=old.npy --space side_info=side.npy makes one from .npy files)")
    if args.out is None:
        raise ValueError("--old needs --out: the transformed gallery to write (.npy, [N, d_new])")
    out = transform(args.checkpoint, args.old, args.out, args.side, args.uncertainty_out, args.batch_size,
                    args.device, args.overwrite)
    meta = json.loads(sidecar(out, "meta").read_text())
    extra = f"; uncertainty per row in {meta['uncertainty']}" if meta.get("uncertainty") else ""
    print(f"transformed gallery written to {out} ({meta['rows']} x {meta['embedding_dim']}, {meta['space']}){extra}")
    return out


def embed_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-embed``."""
    run_command("fct-embed", embed_command, argv)


def transform_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-transform``."""
    run_command("fct-transform", transform_command, argv)
