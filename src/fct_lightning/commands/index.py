"""``fct-index`` (build a FAISS index on one space of a store) and ``fct-search`` (search it with a store of
queries, writing one parquet row per hit); thin wrappers over :mod:`fct_lightning.index`."""

from __future__ import annotations

import argparse
import logging

from fct_lightning.commands import run_command
from fct_lightning.index import build_index, search
from fct_lightning.index.build import BATCH as ADD_BATCH
from fct_lightning.index.search import BATCH as SEARCH_BATCH

DEVICES = ("auto", "cpu", "cuda")


def index_command(argv: list[str] | None = None) -> int:
    """``fct-index`` with ``argv``; returns the exit status."""
    p = argparse.ArgumentParser(prog="fct-index", description="Build a FAISS index of one space of a store: trained "
                                "on a seeded uniform random sample of all shards, ids = the store's row numbers. "
                                "The index is a folder: index.faiss, index.json (what it was built on), and "
                                "lists.ivfdata with --ondisk.")
    p.add_argument("--store", required=True, help="the store folder")
    p.add_argument("--space", required=True, help="the space to index, e.g. fct+side")
    p.add_argument("--factory", required=True, help="a faiss.index_factory string, e.g. Flat, IVF4096,PQ32, HNSW32")
    p.add_argument("--metric", default="l2", choices=("l2", "ip"),
                   help="l2: squared Euclidean; ip: inner product (cosine on normalised rows)")
    p.add_argument("--out", required=True, help="the index folder to create")
    p.add_argument("--train_rows", type=int, default=None,
                   help="size of the random training sample (default: 256 per IVF list, 65,536 to 2,097,152)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    p.add_argument("--ondisk", action="store_true",
                   help="keep the inverted lists on disk, memory-mapped (IVF only; for indexes larger than memory)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="train on the GPU (auto: when FAISS has one)")
    p.add_argument("--batch", type=int, default=ADD_BATCH, help="rows added at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = build_index(args.store, args.space, args.factory, args.out, args.metric, args.train_rows, args.seed,
                         args.ondisk, args.device, args.batch, args.overwrite)
    print(f"{args.out}: {record['index_type']} ({record['factory']}, {record['metric']}) of {record['rows']:,} rows "
          f"of space {record['space']} ({record['dim']}-d), trained on {record['train']['rows']:,} random rows, "
          f"{'on disk, ' if record['ondisk'] else ''}{record['seconds']:.1f} s")
    return 0


def search_command(argv: list[str] | None = None) -> int:
    """``fct-search`` with ``argv``; returns the exit status."""
    p = argparse.ArgumentParser(prog="fct-search", description="Search a fct-index index with every row of a store "
                                "of queries; writes parquet rows query_id, rank (0 = nearest), id, distance.")
    p.add_argument("--index", required=True, help="the index folder (fct-index --out)")
    p.add_argument("--store", required=True, help="the gallery store the index was built on")
    p.add_argument("--queries", required=True, help="the store of the queries (may be --store)")
    p.add_argument("--space", required=True, help="the queries' space, e.g. new")
    p.add_argument("-k", "--k", type=int, default=100, help="hits per query")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: FAISS's 1)")
    p.add_argument("--search_params", default=None, help="more FAISS search parameters, NAME=VALUE,...: efSearch "
                   "(HNSW, default 16), quantizer_efSearch (IVF on an HNSW quantizer), ht (polysemous PQ)")
    p.add_argument("--out", required=True, help="the hits parquet file")
    p.add_argument("--batch", type=int, default=SEARCH_BATCH, help="queries searched at a time")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="search on the GPU (auto: when FAISS has one and the index is in memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    done = search(args.index, args.store, args.queries, args.space, args.k, args.out, args.nprobe, args.batch,
                  args.device, args.overwrite, args.search_params)
    print(f"{done['out']}: {done['hits']:,} hits for {done['queries']:,} queries in {done['seconds']:.1f} s")
    return 0


def index_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-index``."""
    run_command("fct-index", index_command, argv)


def search_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-search``."""
    run_command("fct-search", search_command, argv)
