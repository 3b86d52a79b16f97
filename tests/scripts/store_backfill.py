"""``fct-backfill`` in a process of its own, as tests/test_store_backfill.py runs it.

    python tests/scripts/store_backfill.py [--slow SECONDS] <fct-backfill arguments>

``--slow S`` writes every shard file in blocks of 4 KiB, ``S`` seconds apart, so that a test can kill the job in the
middle of a shard.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    if "--slow" in argv:
        at = argv.index("--slow")
        delay = float(argv[at + 1])
        del argv[at:at + 2]
        from fct_lightning.store import files

        files.CHUNK_BYTES = 4096
        plain = files.write_block

        def slowly(fh, data):  # noqa: ANN001, ANN202
            time.sleep(delay)
            plain(fh, data)

        files.write_block = slowly
    from fct_lightning.commands.backfill import main as backfill_main

    backfill_main(argv)


if __name__ == "__main__":
    main()
