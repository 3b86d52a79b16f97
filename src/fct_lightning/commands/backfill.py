"""``fct-backfill``: one backfilling round on a store (:func:`fct_lightning.gallery.store_backfill.backfill_store`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fct_lightning.commands import run_command


def backfill_command(argv: list[str] | None = None) -> Path:
    """``fct-backfill`` with ``argv``; returns the store written."""
    from fct_lightning.gallery.store_backfill import POLICIES, backfill_store

    p = argparse.ArgumentParser(prog="fct-backfill", description="One backfilling round on a store: re-embed the "
                                "chosen items' images with the new model and write a new space in which exactly "
                                "those rows hold new-model embeddings and the rest their transformed vectors (the "
                                "input space is never modified). The new space's row column 'source' says which "
                                "model made each row (0: h, k: the new model, in round k); resumable.")
    p.add_argument("--store", required=True, help="the store (fct-embed --store, then fct-transform --store)")
    p.add_argument("--h", required=True, help="the transformation that made --space (a FastFill h, e.g. "
                   "fastfill/best.ckpt, for --policy uncertainty or confident)")
    p.add_argument("--checkpoint", required=True, help="the new model h was trained toward (new/best.ckpt)")
    p.add_argument("--policy", required=True, choices=POLICIES, help="uncertainty: FastFill's predicted "
                   "uncertainty, highest first (the paper's order); confident: lowest first (a higher "
                   "top-1 along the way on CIFAR-10, docs/results.md); random: a seeded permutation (--seed); list: "
                   "the ids in --list, in file order")
    p.add_argument("--fraction", type=float, default=None, help="the share of the gallery backfilled AFTER this "
                   "round, counting earlier rounds: 0.1, then 0.2 on the first round's space adds another 10%% "
                   "(rows already backfilled are never chosen again); optional with --policy list (default: every "
                   "listed id)")
    p.add_argument("--list", dest="list_path", default=None, help="--policy list: the ids, one per line (a .jsonl "
                   "or .ids.txt of JSON strings, or FILE.parquet:COLUMN)")
    p.add_argument("--seed", type=int, default=0, help="--policy random: the permutation's seed")
    p.add_argument("--space", default=None, help="the input space: h's transformed gallery (default fct+side, or "
                   "fct for h without side-info), or an earlier round's output (e.g. fct+side-bf1)")
    p.add_argument("--out_space", default=None, help="the space to write (default <base>-bf<round>: fct+side-bf1, "
                   "then fct+side-bf2 from it)")
    items = p.add_mutually_exclusive_group()
    items.add_argument("--images", default=None, help="the folder of the items' image files (ids are paths "
                       "relative to it; default: the folder the store was embedded from)")
    items.add_argument("--split", default=None, help="instead: the dataset split of the items (ids "
                       "<split>/<index>; default: the split the store was embedded from)")
    p.add_argument("--data_root", "--data.root", dest="data_root", default=None,
                   help="where the dataset is, for --split (default: the root the new model was trained with)")
    p.add_argument("--shard", default=None, metavar="I/N", help="this job does shards I, I+N, ... (array jobs; "
                   "default: RANK/WORLD_SIZE under torchrun, else all); the job finishing last publishes the space")
    p.add_argument("--batch_size", type=int, default=None, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers decoding the images")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace a space of that name another job wrote")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} must be at least 1")
    res = backfill_store(args.store, args.h, args.checkpoint, args.policy, args.fraction, args.space,
                         args.out_space, args.images, args.split, args.data_root, args.list_path, args.seed,
                         args.shard, args.batch_size, args.num_workers, args.device, args.overwrite)
    total = res.backfilled
    done = "published" if res.published else "not published yet (the job that finishes last publishes it)"
    print(f"space {res.space} of {res.store} (round {res.round}, from {res.from_space}): {len(res.chosen):,} rows "
          f"chosen by {res.policy}, {total:,} backfilled in all; {len(res.written)} of this job's {len(res.shards)} "
          f"shards written ({res.embedded:,} images embedded); {done}")
    return res.store


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-backfill``."""
    run_command("fct-backfill", backfill_command, argv)
