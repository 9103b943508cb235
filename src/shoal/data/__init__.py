"""Datasets (registered by name or a user's entry point) and worker sharding."""

from shoal.data.base import DatasetBundle, build_dataset
from shoal.data import builtin, partition  # noqa: F401  (registers datasets and client partitions)
from shoal.data.shard import ShardedBatches, shard_indices

__all__ = ["DatasetBundle", "build_dataset", "ShardedBatches", "shard_indices"]
