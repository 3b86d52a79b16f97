"""The production path: embed a gallery once, then move it to each new model with h, without its images.

``fct-embed`` runs one stage's image model (``old``, ``side_info``, ``new`` or ``bct``) over a dataset split or
any folder of images and writes ``<out>.npy`` (float32 ``[N, d]``), with ``<out>.json`` saying which
checkpoint made it (content digest), and which items the rows are (``<out>.ids.txt`` for image files, one JSON
string per line; ``<out>.labels.npy`` for a dataset split). The stored gallery of a deployed system is the
``old`` embeddings plus the ``side_info`` features, computed when the images were at hand.

``fct-transform`` applies a trained transformation h to those stored arrays: ``h(old, side) -> [N, d_new]``,
``--batch_size`` rows at a time through memory-mapped files, so a gallery larger than memory works. It needs only
h's checkpoint (not the frozen image models), checks that the inputs were made by the old and side-info models h
was trained on (their digests, when the ``.json`` files are there), and writes each output to a temporary file
that replaces ``--out`` only when complete. With a FastFill h, ``--uncertainty_out`` also writes each item's
predicted log-variance: backfill the items with the highest values first.

Queries are embedded with the new model (``fct-embed --checkpoint .../new/best.ckpt``) and searched against the
transformed gallery, which is what ``fct-eval`` measures as ``fct+side/old``.
"""

from fct_lightning.gallery.embed import embed
from fct_lightning.gallery.transform import transform

__all__ = ["embed", "transform"]
