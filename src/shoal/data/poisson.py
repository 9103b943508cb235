"""Poisson-sampled batches, the sampling DP-SGD's accountant assumes.

Each worker holds a fixed share of the training set (positions r, r+W, r+2W,
... of one permutation drawn from the seed: which examples a worker holds does
not depend on their content). At every step each example of its share joins
the batch with probability ``rate``, independently of every other example and
step, so a batch's size varies around ``rate`` x the share. Because the shares
do not overlap, W workers sampling their own shares at the same rate are one
Poisson sample of the whole set.

The draws come from the operating system's entropy, unless ``seed`` is given
(tests, reproducible research): then step k of rank r is drawn from
(seed, rank, k) alone, so a resumed run takes the batches an unbroken one would.
"""

from __future__ import annotations

import secrets
from typing import Iterator

import torch
from torch.utils.data import Dataset

from shoal.data.shard import fetch


class PoissonBatches:
    """Endless iterator over this worker's Poisson-sampled ``(inputs, labels)`` batches."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, rate: float, steps_per_epoch: int,
                 layout_seed: int, seed: int | None):
        if not 0 < rate <= 1:
            raise ValueError(f"rate: {rate} must be in (0, 1]")
        self.dataset, self.rank, self.rate = dataset, rank, rate
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(layout_seed))
        self.share = order[: len(dataset) // world_size * world_size][rank::world_size]
        self.steps_per_epoch = steps_per_epoch
        self.split = None  # equal rates: no strategy splits a Poisson batch
        self.seed = seed
        self._entropy = torch.Generator().manual_seed(secrets.randbits(63))

    def _generator(self, step: int) -> torch.Generator:
        if self.seed is None:
            return self._entropy
        return torch.Generator().manual_seed(hash((self.seed, self.rank, step)) & (2**63 - 1))

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = start_step
        while True:
            taken = torch.rand(len(self.share), generator=self._generator(step)) < self.rate
            indices = self.share[taken].tolist()
            if indices:
                yield fetch(self.dataset, indices)
            else:  # nobody drawn: an empty batch of the right shapes (the step still adds its noise)
                x, y = fetch(self.dataset, self.share[:1].tolist())
                yield x[:0], y[:0]
            step += 1
