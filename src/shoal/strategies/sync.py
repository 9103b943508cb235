"""Synchronous data parallel: PyTorch DDP with a shoal codec communication hook.

Every step each worker computes gradients on its own batch, DDP all-reduces
them bucket by bucket while backward still runs, and every worker applies the
same averaged update. The codec decides what each bucket sends; DDP keeps
bucketing and overlap.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.comm.codec_choice import AutoChoice, choose_codec
from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import CodecHookState, codec_hook, residuals_by_parameter, restore_residuals
from shoal.comm.memory import ErrorFeedback
from shoal.comm.wire import WireMeter
from shoal.registry import CODECS, STRATEGIES, Component
from shoal.strategies.balance import ThroughputBalancer
from shoal.strategies.base import StepStats, Strategy


class SyncOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size")
    balance: Literal["none", "throughput"] = Field(
        "none", description="throughput: batch shares proportional to each worker's measured speed"
    )
    rebalance_every: int = Field(20, ge=1, description="steps between re-measuring speeds (balance=throughput)")
    backup: int = Field(0, ge=0, description="b: each update takes the first N-b gradients, drops the rest")

    @model_validator(mode="after")
    def _one_straggler_remedy(self) -> "SyncOptions":
        if self.backup and self.balance != "none":
            raise ValueError("backup and balance=throughput do not combine (choose one)")
        return self


@STRATEGIES.register("sync", SyncOptions)
class SyncStrategy(Strategy):
    """Synchronous data parallel: DDP all-reduce through the codec hook (backup=b: first N-b gradients)."""

    recipe_support = frozenset({"precision", "accumulate", "clip_grad_norm"})  # shoal.engine.recipe
    dp_sgd = True  # privacy: dp_sgd (shoal.privacy.dp_sgd) steps through _private_step

    @classmethod
    def topology(cls, options: SyncOptions) -> str | None:
        """backup=b runs on the parameter server: a collective cannot finish without every rank."""
        return "backup" if options.backup else None

    def __init__(self, model, optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        if self.options.backup:
            raise RuntimeError(f"sync: backup={self.options.backup} runs on the parameter server's "
                               f"{self.topology(self.options)!r} topology, "
                               "under shoal's worker supervisor (shoal train / shoal.train)")
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        self.ddp = DDP(
            model, device_ids=device_ids, bucket_cap_mb=self.options.bucket_cap_mb, process_group=self.group
        )
        # codec: auto is decided at the first step; until then nothing is sent.
        self.auto = self.codec_spec.options if self.codec_spec.target.capabilities.per_bucket else None
        self.codec_choice: AutoChoice | None = None
        if self.auto is not None:
            self.codec_spec = CODECS.resolve("none")
        self.codec = build_codec(self.codec_spec, rank=self.context.rank)
        self.meter = WireMeter()
        self.hook_state = CodecHookState(self.codec, self.meter, self.group)
        self.ddp.register_comm_hook(self.hook_state, codec_hook)
        self.balancer: ThroughputBalancer | None = None
        self.private: Any = None  # shoal.privacy.dp_sgd.DpSgd, from use_dp_sgd

    comm_period = 1  # steps between communications, for codec: auto's cost model

    def choose_codec(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """``codec: auto``: probe and choose before the first gradient is sent."""
        if self.auto is None or self.codec_choice is not None:
            return
        component, self.codec_choice = choose_codec(
            self.model, self.loss_fn, inputs, targets, self.auto, group=self.group, rank=self.context.rank,
            period=self.comm_period, bucket_cap_mb=self.options.bucket_cap_mb,
        )
        self._use_codec(component)
        if self.context.rank == 0:
            print(self.codec_choice.reason(), flush=True)

    def _use_codec(self, component: Component) -> None:
        self.codec_spec = component
        self.codec = build_codec(component, rank=self.context.rank)
        self.hook_state.codec = self.codec
        self.hook_state.memory = ErrorFeedback() if self.codec.options.memory == "ef" else None

    def use_masks(self, masks: Any) -> None:
        self.hook_state.masks = masks  # the hook packs each bucket to its kept weights' gradients

    def split_batch(self, batch_size: int) -> Callable[[], list[int]] | None:
        if self.options.balance == "none":
            return None
        self.balancer = ThroughputBalancer(
            world_size=self.context.world_size, batch_size=batch_size, every=self.options.rebalance_every
        )
        return lambda: self.balancer.sizes

    def use_dp_sgd(self, mechanism: Any) -> None:
        """Take every step by DP-SGD (``privacy: dp_sgd``): per-example clipping and noise, then a plain sum."""
        self.private = mechanism

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        if self.private is not None:
            return self._private_step(inputs, targets)
        started = time.perf_counter()
        self.choose_codec(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        # Unequal shares: weight by samples so DDP's mean is the per-sample mean.
        weight = self.balancer.loss_weight(self.context.rank) if self.balancer else 1.0
        # The last micro-batch's backward returns once DDP's hook futures have completed.
        loss = self.recipe.gradients(lambda x, y: self.loss_fn(self.ddp(x), y), inputs, targets,
                                     quiet=self.ddp.no_sync, weight=weight)
        self.recipe.step(self.optimizer, self.model.parameters())
        stats = self.stats(loss, started, len(targets))
        if self.balancer is not None:
            self.balancer.record(stats.compute_s, stats.samples, self.group)
        return stats

    def _private_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """DP-SGD: each worker's clipped sum (rank 0's noised) over the expected global batch, all-reduced
        as one flat sum: no DDP backward (its hooks would average unclipped gradients)."""
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.private.gradients(self.model, self.loss_fn, inputs, targets, chunks=self.recipe.accumulate)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        sent = self.meter.sent([flat], flat.numel())
        dist.all_reduce(flat, group=self.group)
        self.meter.done(sent)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.optimizer.step()
        self.private.ledger.record(1)
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
        choice = self.codec_choice.as_dict() if self.codec_choice is not None else None
        balance = self.balancer.state_dict() if self.balancer is not None else None
        names = {id(p): name for name, p in self.model.named_parameters()}
        return {"codec": self.codec.state_dict(), "memory": {"by_parameter": residuals_by_parameter(self.hook_state, names)}
                if memory else {}, "auto": choice, "balance": balance,
                "privacy": self.private.state_dict() if self.private is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.auto is not None and state.get("auto"):
            # Keep the first session's choice: its residuals belong to that codec.
            self.codec_choice = AutoChoice(**state["auto"])
            self._use_codec(CODECS.resolve(self.codec_choice.codec))
        if self.private is not None and state.get("privacy"):
            self.private.load_state_dict(state["privacy"])  # the budget spent before the checkpoint
        if self.balancer is not None and state.get("balance"):
            self.balancer.load_state_dict(state["balance"])
        self.codec.load_state_dict(state.get("codec", {}))
        if self.hook_state.memory is not None:
            saved = state.get("memory", {})
            if "by_parameter" in saved:
                restore_residuals(self.hook_state, saved["by_parameter"], dict(self.model.named_parameters()))
            elif saved.get("residuals"):  # an older checkpoint's, by bucket position: not safe to place
                warnings.warn("the checkpoint keeps error-feedback residuals by bucket position (an older "
                              "format); they are dropped and error feedback starts again from zero", stacklevel=2)
