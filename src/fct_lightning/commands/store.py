"""``fct-store``: create a store from existing arrays (``import``), describe one (``info``), check one (``verify``)."""

from __future__ import annotations

import argparse
import logging

from fct_lightning.commands import run_command
from fct_lightning.gallery.files import read_meta
from fct_lightning.store import DEFAULT_SHARD_ROWS, DTYPES, Store, import_arrays, open_store, verify_store


def _spaces(pairs: list[str]) -> dict[str, str]:
    spaces: dict[str, str] = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--space {pair!r} must be NAME=FILE.npy or NAME=FILE.parquet:COLUMN, e.g. "
                             "--space old=old.npy")
        if name in spaces:
            raise ValueError(f"--space {name} is given twice; give each space once")
        spaces[name] = source
    return spaces


def _describe(store: Store) -> list[str]:
    cols = ", ".join(f"{k} ({v})" for k, v in store.manifest.get("columns", {}).items())
    lines = [f"{store.path}: {store.rows:,} items in {len(store.shards)} shard(s) of {store.shard_rows:,} rows",
             f"columns: {cols}", f"digest: {store.digest()}"]
    for name, s in sorted(store.spaces.items()):
        lines.append(f"space {name}: role {s.role}, dim {s.dim}, {s.dtype}, "
                     f"{'normalised' if s.normalized else 'not normalised'}, checkpoint {s.checkpoint_digest or '-'}")
    if not store.spaces:
        lines.append("no spaces yet")
    unfinished = sorted(p.name for p in store.path.iterdir()
                        if p.name not in store.spaces and (p / ".progress" / "space.json").is_file())
    if unfinished:
        lines.append(f"unfinished (not published; run their jobs again): {', '.join(unfinished)}")
    return lines


def store_command(argv: list[str] | None = None) -> int:
    """``fct-store`` with ``argv``; returns the exit status (1 when ``verify`` finds problems)."""
    p = argparse.ArgumentParser(prog="fct-store", description="Embedding stores: a folder of aligned shards "
                                "(meta/part-N.parquet, <space>/part-N.npy) described by manifest.json.")
    sub = p.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="create a store (or add spaces to one) from .npy or parquet arrays")
    imp.add_argument("--out", required=True, help="the store folder")
    imp.add_argument("--space", action="append", required=True, metavar="NAME=FILE",
                     help="a space and its rows: old=old.npy, or new=emb.parquet:COLUMN (repeat for more spaces)")
    imp.add_argument("--ids", default=None, help="the items' ids: a text file with one per line, or "
                     "FILE.parquet:COLUMN (default: an older-format x.ids.txt, else the row numbers)")
    imp.add_argument("--labels", default=None, help="a .npy with one integer label per item")
    imp.add_argument("--shard_rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per shard")
    imp.add_argument("--dtype", default=None, choices=DTYPES, help="stored dtype (default: each source's)")
    imp.add_argument("--normalized", action="append", default=[], metavar="NAME",
                     help="a space whose rows are L2-normalised (repeat for more)")
    imp.add_argument("--overwrite", action="store_true", help="replace spaces written by another job")
    for name, text in (("info", "describe a store"), ("verify", "check every file of a store (exit status 1 on "
                                                                "problems)")):
        one = sub.add_parser(name, help=text)
        one.add_argument("store", help="the store folder")
    sub.choices["verify"].add_argument("--quick", action="store_true",
                                       help="check presence, sizes and headers only, not checksums or NaN rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "import":
        store = import_arrays(args.out, _spaces(args.space), args.ids, args.labels, args.shard_rows, args.dtype,
                              args.normalized, args.overwrite, describe=read_meta)
        print("\n".join(_describe(store)))
        return 0
    if args.action == "info":
        print("\n".join(_describe(open_store(args.store))))
        return 0
    problems = verify_store(args.store, check_content=not args.quick)
    print("\n".join(problems) if problems else f"{args.store}: every shard of every space matches the manifest")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fct-store``."""
    status = run_command("fct-store", store_command, argv)
    if status:
        raise SystemExit(status)
