"""Throughput balancing: unequal workers get unequal shares of the global batch.

Synchronous data parallel waits for its slowest worker every step. With
``sync:balance=throughput`` each worker's share of the fixed global batch is
proportional to its measured speed, so all finish their part at about the same
time:

1. every step each worker records its compute seconds per sample
2. every ``rebalance_every`` steps the workers all-gather the median of their
   window, and split the global batch ``N x batch_size`` in proportion to
   1 / (seconds per sample), by largest remainders, at least one sample each
3. each worker's loss is scaled by ``N n_i / sum(n)`` so that DDP's mean of
   gradients is the sample-weighted mean: the same update as equal batches
   drawn from the same global batch

The global batch at a step is the same set of samples whatever the split
(see ``shoal.data.shard``), so balancing changes who computes what, never
what is computed.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.distributed as dist


def proportional_split(total: int, speeds: list[float], minimum: int = 1) -> list[int]:
    """``total`` items split in proportion to ``speeds`` (largest remainders), ``minimum`` each."""
    n = len(speeds)
    if total < minimum * n:
        raise ValueError(f"cannot give {n} workers {minimum} of {total} items each")
    if any(s <= 0 for s in speeds):
        raise ValueError(f"speeds must be positive, got {speeds}")
    spare = total - minimum * n
    shares = [spare * s / sum(speeds) for s in speeds]
    sizes = [minimum + int(share) for share in shares]
    # Hand what rounding left to the largest remainders; ties to the lower rank.
    order = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


class ThroughputBalancer:
    """Per-worker batch sizes from measured speed; checkpointable."""

    def __init__(self, *, world_size: int, batch_size: int, every: int):
        self.world_size = world_size
        self.total = world_size * batch_size
        self.every = every
        self.sizes = [batch_size] * world_size
        self.window: list[float] = []  # seconds per sample, this worker, since the last rebalance
        self.steps = 0

    def loss_weight(self, rank: int) -> float:
        return self.world_size * self.sizes[rank] / self.total

    def record(self, compute_s: float, samples: int, group: Any = None) -> None:
        """Note one step; every ``every`` steps, agree on new sizes (a collective)."""
        self.window.append(compute_s / max(samples, 1))
        self.steps += 1
        if self.steps % self.every:
            return
        mine = torch.tensor([statistics.median(self.window)], dtype=torch.float64)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=group)
        per_sample = [max(t.item(), 1e-9) for t in everyone]
        self.sizes = proportional_split(self.total, [1 / s for s in per_sample])
        self.window = []

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "window": list(self.window), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("sizes", [])) == self.world_size:
            self.sizes = list(state["sizes"])
            self.window = list(state["window"])
            self.steps = state["steps"]
