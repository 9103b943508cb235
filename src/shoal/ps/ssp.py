"""``ssp``: stale-synchronous parallel (Ho et al. 2013, "More effective
distributed ML via a stale synchronous parallel parameter server").

Pushes are applied on arrival, as in ``async_ps``, but a worker that has
finished c steps gets its reply (and so starts step c + 1) only once the
slowest worker has finished at least c - s. ``staleness=0`` runs in lockstep;
a large s approaches asynchronous training. Workers that have taken their last
step no longer hold anyone back.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.ps.shard import ParameterShard, Policy, Reply
from shoal.ps.strategy import PsStrategy
from shoal.registry import STRATEGIES


class SspOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    staleness: int = Field(2, ge=0, le=10_000, description="s: steps a worker may run ahead of the slowest")
    servers: int = Field(1, ge=1, le=64, description="S: parameter shards, served by ranks 0..S-1")
    staleness_lr: bool = Field(False, description="divide a push's learning rate by its staleness")


class SspPolicy(Policy):
    """Apply on arrival; hold a reply while its worker is more than s clocks ahead."""

    def __init__(self, staleness: int, workers: int):
        self.staleness = staleness
        self.clocks: dict[int, float] = {w: 0 for w in range(workers)}
        self.waiting: list[tuple[int, torch.futures.Future, int]] = []  # (clock, reply future, staleness)

    def push(self, shard: ParameterShard, worker: int, version: int, clock: int, grad: torch.Tensor,
             lr: float) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        with shard.lock:
            staleness = shard.version - version
            shard.apply(grad, lr, staleness)
            self.clocks[worker] = clock
            self.waiting.append((clock, future, staleness))
            ready = self._release(shard)
        for waiting, reply in ready:
            waiting.set_result(reply)
        return future

    def _release(self, shard: ParameterShard) -> list[tuple[torch.futures.Future, Reply]]:
        """Replies now allowed (caller holds the lock; results are set outside it)."""
        slowest = min(self.clocks.values(), default=math.inf)
        ready, still = [], []
        for clock, future, staleness in self.waiting:
            if shard.stop or clock - slowest <= self.staleness:
                ready.append((future, shard.reply(staleness)))
            else:
                still.append((clock, future, staleness))
        self.waiting = still
        return ready

    def finished(self, shard: ParameterShard, worker: int | None) -> None:
        with shard.lock:
            if worker is not None:
                self.clocks[worker] = math.inf
            ready = self._release(shard)
        for future, reply in ready:
            future.set_result(reply)


@STRATEGIES.register("ssp", SspOptions)
class SspStrategy(PsStrategy):
    """Stale-synchronous parallel: a worker runs at most ``staleness`` steps ahead of the slowest."""

    @classmethod
    def make_policy(cls, options: SspOptions, workers: int) -> SspPolicy:
        return SspPolicy(options.staleness, workers)
