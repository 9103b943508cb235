"""Datasets (registered by name or a user's entry point) and worker sharding."""

from shoal.data.base import DatasetBundle, build_dataset
from shoal.data import builtin  # noqa: F401  (registers mnist1d, digits, synthetic)
from shoal.data.shard import ShardedBatches, shard_indices

__all__ = ["DatasetBundle", "build_dataset", "ShardedBatches", "shard_indices"]
