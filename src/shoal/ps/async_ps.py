"""``async_ps``: asynchronous parameter-server training (Downpour SGD, Dean et al. 2012).

Each push is applied the moment it arrives and answered at once with the
shard's current parameters; no worker ever waits for another. The price is
staleness: a gradient computed on version v lands on version v + k. With
``staleness_lr=true`` its learning rate is divided by k (Zhang et al. 2016,
"Staleness-aware async-SGD").
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.ps.shard import ParameterShard, Policy, done_future
from shoal.ps.strategy import PsStrategy
from shoal.registry import STRATEGIES


class AsyncPsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    servers: int = Field(1, ge=1, le=64, description="S: parameter shards, served by ranks 0..S-1")
    staleness_lr: bool = Field(False, description="divide a push's learning rate by its staleness")


class AsyncPolicy(Policy):
    """Apply on arrival, reply at once; nobody waits on anybody."""

    def push(self, shard: ParameterShard, worker: int, version: int, clock: int, grad: torch.Tensor,
             lr: float) -> torch.futures.Future:
        with shard.lock:
            staleness = shard.version - version
            shard.apply(grad, lr, staleness)
            return done_future(shard.reply(staleness))


@STRATEGIES.register("async_ps", AsyncPsOptions)
class AsyncPsStrategy(PsStrategy):
    """Asynchronous parameter server: pushes applied on arrival, staleness recorded."""

    @classmethod
    def make_policy(cls, options: AsyncPsOptions, workers: int) -> AsyncPolicy:
        return AsyncPolicy()
