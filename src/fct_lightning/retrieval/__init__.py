"""Retrieval evaluation: distances and neighbour order (neighbors.py), metrics (metrics.py) and the evaluate entry
point."""

from .evaluate import auto_chunk_size, evaluate, evaluate_mixtures
from .metrics import QueryMetrics, build_class_index, query_metrics, summarize
from .neighbors import BACKENDS, DISTANCES, canonical_distances

__all__ = ["BACKENDS", "DISTANCES", "QueryMetrics", "auto_chunk_size", "build_class_index",
           "canonical_distances", "evaluate", "evaluate_mixtures", "query_metrics", "summarize"]
