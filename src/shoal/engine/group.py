"""The few collectives the training loop itself needs, behind one small interface.

The loop talks to the job's other ranks only at the edges of a run (does a
checkpoint exist, restore it, gather every worker's state, sum the counters).
:class:`TorchGroup` does that on the default process group. A worker process
run under a supervisor (``shoal.ps.supervisor``) has no process group of
its own, since it may die and be replaced; its :class:`~shoal.ps.proxy.SupervisorProxy`
asks the supervising process, which holds one, to do the same calls.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist


class Group:
    """Rank-0-rooted collectives over a job's ranks (one object per process)."""

    def barrier(self) -> None:
        raise NotImplementedError

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def all_reduce(self, values: list[float], op: Literal["sum", "max"] = "sum") -> list[float]:
        raise NotImplementedError


class TorchGroup(Group):
    """The default process group (a one-rank job needs none)."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size = world_size
        self.device = device

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce(self, values: list[float], op: Literal["sum", "max"] = "sum") -> list[float]:
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()
