"""PyTorch's own DDP paths, as baselines that benchmarks run beside shoal's.

``ddp:hook=builtin`` is plain DDP (its C++ all-reduce, no Python hook);
``fp16`` and ``powersgd`` register PyTorch's ``fp16_compress_hook`` and
``powerSGD_hook`` from ``torch.distributed.algorithms.ddp_comm_hooks``;
``local`` registers a hook that returns the local gradient without any
communication: the compute-only ceiling of any codec.

Wire bytes: for ``builtin`` DDP hands every gradient, in fp32, to the process
group once per step, so that is counted from the parameters; for the PyTorch
hooks every ``torch.distributed.all_reduce`` call is counted as it is made (a
counting wrapper, installed in this worker process only).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.comm.hooks import local_gradient_hook
from shoal.comm.wire import WireMeter
from shoal.registry import STRATEGIES
from shoal.strategies.base import StepStats, Strategy


class DdpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hook: Literal["builtin", "fp16", "powersgd", "local"] = "builtin"
    rank: int = Field(2, ge=1, description="matrix_approximation_rank of powerSGD_hook")
    start_iter: int = Field(10, ge=1, description="start_powerSGD_iter: exact all-reduce before it")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP bucket size (powersgd uses one big bucket)")


_METER: WireMeter | None = None  # set only while a training step runs


def _count_all_reduce() -> None:
    """Route ``torch.distributed.all_reduce`` through a byte counter (once per process).

    Calls count only while a step is running (``_METER`` set), so evaluation's
    own all-reduces are not taken for gradient traffic. PowerSGD's later
    rounds run in future callbacks, but those complete inside ``backward()``.
    """
    if getattr(dist.all_reduce, "_shoal_counted", False):
        return
    original = dist.all_reduce

    @functools.wraps(original)
    def counted(tensor, *args, **kwargs):
        if _METER is not None:
            _METER.sent([tensor], tensor.numel())
        return original(tensor, *args, **kwargs)

    counted._shoal_counted = True  # type: ignore[attr-defined]
    dist.all_reduce = counted


@STRATEGIES.register("ddp", DdpOptions)
class DdpBaseline(Strategy):
    """PyTorch DDP with its built-in all-reduce or one of its own hooks (benchmark baselines)."""

    recipe_support = frozenset({"precision", "accumulate", "clip_grad_norm"})  # shoal.engine.recipe

    accepts_codec = False

    def __init__(self, model, optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        opts = self.options
        # PowerSGD on gloo with several buckets issues its chained all-reduces in
        # different orders on different ranks and hangs: one bucket avoids it.
        cap = max(opts.bucket_cap_mb, 1024.0) if opts.hook == "powersgd" else opts.bucket_cap_mb
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        self.ddp = DDP(model, device_ids=device_ids, bucket_cap_mb=cap, process_group=self.group)
        self.meter = WireMeter()
        self.dense_per_step = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if opts.hook == "fp16":
            self.ddp.register_comm_hook(self.group, default_hooks.fp16_compress_hook)
        elif opts.hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(
                process_group=self.group,
                matrix_approximation_rank=opts.rank,
                start_powerSGD_iter=opts.start_iter,
                min_compression_rate=1,
            )
            self.ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif opts.hook == "local":
            self.ddp.register_comm_hook(None, local_gradient_hook)
        if opts.hook in ("fp16", "powersgd"):
            _count_all_reduce()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        global _METER
        started = time.perf_counter()
        _METER = self.meter
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.recipe.gradients(lambda x, y: self.loss_fn(self.ddp(x), y), inputs, targets,
                                         quiet=self.ddp.no_sync)
            self.recipe.step(self.optimizer, self.model.parameters())
        finally:
            _METER = None
        wall = time.perf_counter() - started
        wire = self.meter.take()
        if self.options.hook == "builtin":
            wire.wire_bytes = self.dense_per_step * 4
        dense = self.dense_per_step * 4 if self.options.hook != "local" else 0
        return StepStats(
            loss=loss.item(),
            compute_s=wall,  # PyTorch's paths expose no per-collective timing
            comm_s=0.0,
            wire_bytes=wire.wire_bytes,
            dense_bytes=dense,
            samples=len(targets),
        )
