"""Test-set evaluation split across workers, each item counted exactly once.

1. Each worker takes its shard of the test set (items rank, rank + N, ...).
2. Per batch, the task gives sums over the batch's items (:meth:`Task.batch_sums`).
3. The sums are added over the worker's batches, then all-reduced over the workers.
4. The task turns the totals into its named metrics (:meth:`Task.metrics`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from shoal.data.shard import fetch, shard_indices
from shoal.tasks.base import Task, build_task


@torch.no_grad()
def evaluate_task(
    model: nn.Module, dataset: Dataset, task: Task, *, batch_size: int, device: torch.device, rank: int,
    world_size: int,
) -> dict[str, float]:
    """The task's metrics (``loss`` first) over the whole test set."""
    was_training = model.training
    model.eval()
    indices = shard_indices(len(dataset), rank, world_size)
    if not indices and world_size > 1 and task.has_extra_metrics:
        # The user's metrics are named by what their function returns: a worker without a batch cannot know them.
        raise ValueError(f"the test set's {len(dataset)} items are fewer than the {world_size} workers that "
                         "evaluate it; a task's metrics= needs a test item on every worker")
    names = list(task.sum_names)
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        x, y = fetch(dataset, indices[start : start + batch_size])
        sums = task.batch_sums(model(x.to(device)), y.to(device))
        if len(sums) > len(names):  # the first batch names the user's metrics
            names += [name for name in sums if name not in names]
            totals = torch.cat([totals, totals.new_zeros(len(names) - len(totals))])
        totals += torch.stack([torch.as_tensor(sums[name], dtype=torch.float64, device=device) for name in names])
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    return task.metrics(dict(zip(names, totals.tolist())))


def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device, rank: int, world_size: int
) -> tuple[float, float]:
    """Classification: ``(mean loss, accuracy)`` over the whole test set."""
    metrics = evaluate_task(model, dataset, build_task(), batch_size=batch_size, device=device, rank=rank,
                            world_size=world_size)
    return metrics["loss"], metrics["accuracy"]
