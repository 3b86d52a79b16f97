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
    """``fct-embed`` with ``argv``; returns the embeddings file written."""
    p = argparse.ArgumentParser(prog="fct-embed", description="Embed a split or a folder of images with one "
                                "stage's image model; writes OUT.npy and OUT.json (which checkpoint, which items).")
    _inputs(p, "an old, side_info, new or bct checkpoint (best.ckpt)", "the embeddings file to write (.npy)")
    p.add_argument("--split", default=None, help="a split of the checkpoint's dataset (default: its eval split)")
    p.add_argument("--images", default=None, help="instead: a folder of image files (searched recursively)")
    p.add_argument("--data_root", "--data.root", dest="data_root", default=None,
                   help="where the dataset is (default: the root the stage was trained with)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave out image files that cannot be decoded (listed in OUT.json) instead of stopping")
    args = _parse(p, argv)
    out = embed(args.checkpoint, args.out, args.split, args.images, args.data_root, args.batch_size,
                args.num_workers, args.device, args.overwrite, args.skip_unreadable)
    meta = json.loads(sidecar(out, "meta").read_text())
    print(f"embeddings written to {out} ({meta['rows']} x {meta['embedding_dim']})")
    return out


def transform_command(argv: list[str] | None = None) -> Path:
    """``fct-transform`` with ``argv``; returns the transformed gallery written."""
    p = argparse.ArgumentParser(prog="fct-transform", description="Map a stored gallery (old embeddings and "
                                "side-info, no images) into the new model's space with a trained transformation.")
    _inputs(p, "the transformation's checkpoint (transformation/best.ckpt)",
            "the transformed gallery to write (.npy, [N, d_new])")
    p.add_argument("--old", required=True, help="the stored old-model embeddings (.npy, [N, d_old])")
    p.add_argument("--side", default=None, help="the stored side-info features (.npy, [N, d_side])")
    p.add_argument("--uncertainty_out", default=None,
                   help="FastFill: also write each item's log-variance (.npy, [N]); backfill the highest first")
    p.add_argument("--batch_size", type=int, default=8192,
                   help="rows per forward pass (h's activations: about 16 bytes x mixer width per row, "
                        "some 256 MiB at 8,192 rows and width 2,048)")
    args = _parse(p, argv)
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
