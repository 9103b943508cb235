"""``sync:backup=b``: synchronous SGD with backup workers (Chen et al. 2016,
"Revisiting distributed synchronous SGD").

Each version of the parameters takes the mean of the first N - b gradients
computed on it and moves on; the b late ones are dropped when they arrive,
and their workers get the current parameters back to start again. A slow
worker therefore costs nothing but its own wasted step. Built on the
parameter-server machinery (:mod:`shoal.ps`): collectives cannot
finish without every rank.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.ps.shard import ParameterShard, Policy, Reply, done_future
from shoal.ps.strategy import PsStrategy
from shoal.registry import TOPOLOGIES


class BackupPolicy(Policy):
    """Mean of the first ``quorum`` pushes of each version; later ones dropped."""

    def __init__(self, backup: int, workers: int):
        self.quorum = workers - backup
        self.active = set(range(workers))
        self.total: torch.Tensor | None = None
        self.count = 0
        self.lr = 0.0
        self.waiting: list[torch.futures.Future] = []
        self.dropped = 0

    def push(self, shard: ParameterShard, worker: int, version: int, clock: int, grad: torch.Tensor,
             lr: float) -> torch.futures.Future:
        with shard.lock:
            if version < shard.version:  # computed on parameters already replaced
                self.dropped += 1
                return done_future(shard.reply(-1))
            self.total = grad.clone() if self.total is None else self.total.add_(grad)
            self.count += 1
            self.lr = lr
            future: torch.futures.Future = torch.futures.Future()
            self.waiting.append(future)
            ready = self._maybe_apply(shard)
        for waiting, reply in ready:
            waiting.set_result(reply)
        return future

    def _maybe_apply(self, shard: ParameterShard) -> list[tuple[torch.futures.Future, Reply]]:
        needed = min(self.quorum, len(self.active))
        if self.total is None or (self.count < needed and not shard.stop):
            return []
        shard.apply(self.total / self.count, self.lr, 0)
        ready = [(future, shard.reply(0)) for future in self.waiting]
        self.total, self.count, self.waiting = None, 0, []
        return ready

    def finished(self, shard: ParameterShard, worker: int | None) -> None:
        with shard.lock:
            if worker is not None:
                self.active.discard(worker)
            ready = self._maybe_apply(shard)
        for future, reply in ready:
            future.set_result(reply)

    def state_dict(self) -> dict[str, Any]:
        return {"dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dropped = state.get("dropped", 0)


@TOPOLOGIES.register("backup")
class BackupSyncStrategy(PsStrategy):
    """``sync`` with ``backup=b``: each update is the mean of the first N - b gradients."""

    @classmethod
    def server_count(cls, options: Any) -> int:
        return 1

    @classmethod
    def check(cls, options: Any, codec: Any, world_size: int) -> None:
        if not 1 <= options.backup < world_size:
            raise ValueError(f"sync: backup={options.backup} must leave at least one of the {world_size} workers")
        super().check(options, codec, world_size)

    @classmethod
    def make_policy(cls, options: Any, workers: int) -> BackupPolicy:
        return BackupPolicy(options.backup, workers)
