"""Test-set evaluation split across workers, each item counted exactly once."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from shoal.data.shard import fetch, shard_indices


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device, rank: int, world_size: int
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` over the whole test set."""
    was_training = model.training
    model.eval()
    indices = shard_indices(len(dataset), rank, world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(0, len(indices), batch_size):
        x, y = fetch(dataset, indices[start : start + batch_size])
        x, y = x.to(device), y.to(device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == y).sum().double()
        totals[2] += len(y)
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss, correct, count = totals.tolist()
    return loss / count, correct / count
