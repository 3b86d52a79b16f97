"""``fct-embed`` in a process of its own, as tests/test_store_embed.py runs it (also under DDP: Lightning re-runs
this script for the other ranks).

    python tests/scripts/store_embed.py [--slow SECONDS] <fct-embed arguments>

``--slow S`` sleeps S seconds after each batch is written, so that a test can kill the job mid-run.
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
        from fct_lightning.gallery.writer import StoreWriter

        write = StoreWriter.write_on_batch_end

        def slow(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            write(self, *args, **kwargs)
            time.sleep(delay)

        StoreWriter.write_on_batch_end = slow
    from fct_lightning.commands.gallery import embed_main

    embed_main(argv)


if __name__ == "__main__":
    main()
