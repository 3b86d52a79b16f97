"""Retrieval evaluation: neighbour search (neighbors.py; the function `search` is exported here), metrics (metrics.py) and the evaluate entry point."""

from .evaluate import auto_chunk_size, evaluate, evaluate_mixtures
from .metrics import QueryMetrics, build_class_index, query_metrics, summarize
from .neighbors import BACKENDS, DISTANCES, canonical_distances, search

CASES: tuple[str, ...] = ("old/old", "new/new", "new/old", "bct/old", "bct/bct", "fct/old", "fct+side/old",
                          "side/side")
"""The evaluation case vocabulary (``<query model>/<gallery model>``), used in code, logs and tables."""

__all__ = ["BACKENDS", "CASES", "DISTANCES", "QueryMetrics", "auto_chunk_size", "build_class_index",
           "canonical_distances", "evaluate", "evaluate_mixtures", "query_metrics", "search", "summarize"]
