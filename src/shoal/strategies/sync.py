"""Synchronous data parallel: PyTorch DDP with a shoal codec communication hook.

Every step each worker computes gradients on its own batch, DDP all-reduces
them bucket by bucket while backward still runs, and every worker applies the
same averaged update. The codec decides what each bucket sends; DDP keeps
bucketing and overlap.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import CodecHookState, codec_hook
from shoal.comm.wire import WireMeter
from shoal.registry import STRATEGIES
from shoal.strategies.base import StepStats, Strategy


class SyncOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size")


@STRATEGIES.register("sync", SyncOptions)
class SyncStrategy(Strategy):
    """Synchronous all-reduce data parallel (DDP + codec hook)."""

    def __init__(self, model, optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        self.ddp = DDP(
            model, device_ids=device_ids, bucket_cap_mb=self.options.bucket_cap_mb, process_group=self.group
        )
        self.codec = build_codec(self.codec_spec, rank=self.context.rank)
        self.meter = WireMeter()
        self.hook_state = CodecHookState(self.codec, self.meter, self.group)
        self.ddp.register_comm_hook(self.hook_state, codec_hook)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.ddp(inputs), targets)
        loss.backward()  # returns once DDP's hook futures have all completed
        self.optimizer.step()
        return self.stats(loss, started, len(targets))

    def stats(self, loss: torch.Tensor, started: float, samples: int) -> StepStats:
        """Close a step: its wall time split into communication and the rest."""
        wall = time.perf_counter() - started
        wire = self.meter.take()
        return StepStats(
            loss=loss.item(),
            compute_s=max(wall - wire.comm_s, 0.0),
            comm_s=wire.comm_s,
            wire_bytes=wire.wire_bytes,
            dense_bytes=wire.dense_bytes,
            samples=samples,
        )

    def state_dict(self) -> dict[str, Any]:
        memory = self.hook_state.memory
        return {"codec": self.codec.state_dict(), "memory": memory.state_dict() if memory else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.codec.load_state_dict(state.get("codec", {}))
        if self.hook_state.memory is not None:
            self.hook_state.memory.load_state_dict(state.get("memory", {}))
