"""Dataset builders: structures generated here with real calculators, never downloaded."""

from .clusters import random_cluster, relaxed_clusters

__all__ = ["random_cluster", "relaxed_clusters"]
