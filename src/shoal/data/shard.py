"""Each worker's share of the data, deterministic given the seed.

Shuffling and sharding are ``torch.utils.data.DistributedSampler``'s: each
epoch draws one permutation from ``seed + epoch`` and rank r takes positions
r, r+N, r+2N, ... Taking ``batch_size`` consecutive items of that shard per
step means that at step k the N workers together hold exactly positions
``k*N*b .. (k+1)*N*b - 1`` of the permutation: the same global batch one
process with batch ``N*b`` would see. That is what makes N-worker synchronous
training equal to single-process training, and a resumed run equal to an
unbroken one.

A strategy may split each global batch unequally (``split``: a callable giving
every worker's share for the next step). The global batch is then taken as
that contiguous slice of the permutation, and worker r takes its share of it:
the same samples in every step as with equal shards, divided differently.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate


class ShardedBatches:
    """Endless iterator over this worker's ``(inputs, labels)`` batches."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, batch_size: int, seed: int):
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.split: Callable[[], list[int]] | None = None
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        # The whole permutation (DistributedSampler's, before it deals it out) for split batches.
        self.whole = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} x {world_size} workers is larger than the "
                f"{len(dataset)}-sample training set"
            )

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.whole.set_epoch(epoch)
            if self.split is None:
                indices = list(self.sampler)
            else:
                everything = list(self.whole)
            for i in range(offset, self.steps_per_epoch):
                if self.split is None:
                    yield fetch(self.dataset, indices[i * self.batch_size : (i + 1) * self.batch_size])
                    continue
                sizes = self.split()
                if len(sizes) != self.world_size or sum(sizes) != self.world_size * self.batch_size:
                    raise ValueError(f"split {sizes}: expected {self.world_size} shares of "
                                     f"{self.world_size * self.batch_size} samples")
                start = i * self.world_size * self.batch_size + sum(sizes[: self.rank])
                yield fetch(self.dataset, everything[start : start + sizes[self.rank]])
            epoch, offset = epoch + 1, 0


def fetch(dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorDataset):
        index = torch.as_tensor(indices)
        x, y = dataset.tensors[0][index], dataset.tensors[1][index]
        return x, y
    x, y = default_collate([dataset[i] for i in indices])
    return torch.as_tensor(x), torch.as_tensor(y)


def shard_indices(size: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard: every item exactly once across workers, no padding."""
    return list(range(rank, size, world_size))
