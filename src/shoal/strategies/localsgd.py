"""Local SGD with post-local warm-up (Lin et al. 2020, "Don't use large mini-batches, use local SGD").

1. for the first ``warmup`` steps: synchronous data parallel, gradients
   all-reduced every step (DDP with the codec hook, exactly as ``sync``)
2. then each worker steps on its own; every ``period`` steps the workers
   average their models: the change since the last average (the delta) goes
   through the codec, with error feedback if the codec asks for it, and every
   worker adds the mean delta to the last averaged model
Averaging deltas rather than weights is what lets a lossy codec apply: the
delta is small and gradient-like, and with ``codec: none`` the result is the
plain parameter average. Optimizer state (momentum) stays local, as in the paper.

Hierarchical (the paper's section 3.2): with ``group_size=G`` the workers form
groups of G consecutive ranks (a node's processes, a site's machines). Every
``period`` local steps each group averages its models exactly, over its own
fast links; every ``global_period``-th of those averages is global instead,
through the codec, across the slow links between groups.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ConfigDict, Field, model_validator

from shoal.comm import layout
from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import CodecHookState, exchange
from shoal.registry import CODECS, STRATEGIES
from shoal.strategies.base import StepStats
from shoal.strategies.sync import SyncOptions, SyncStrategy


class LocalSgdOptions(SyncOptions):
    model_config = ConfigDict(extra="forbid")
    period: int = Field(8, ge=1, description="H: local steps between model averages")
    warmup: int = Field(0, ge=0, description="W: synchronous steps before local SGD starts")
    group_size: int = Field(0, ge=0, description="G: workers per group for hierarchical averaging; 0 = flat")
    global_period: int = Field(4, ge=1, description="K: group averages per global average (hierarchical only)")

    @model_validator(mode="after")
    def _sync_only_options(self) -> "LocalSgdOptions":
        if self.balance != "none":
            raise ValueError("balance: local steps are not averaged per sample (allowed: none)")
        if self.backup:
            raise ValueError("backup: local SGD has no per-step gradient exchange to cut short (allowed: 0)")
        return self


@STRATEGIES.register("localsgd", LocalSgdOptions)
class LocalSgdStrategy(SyncStrategy):
    """Post-local SGD: synchronous for ``warmup`` steps, then average models every ``period`` steps."""

    dp_sgd = False  # its local steps would each need their own noise: not accounted for

    def __init__(self, model, optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        self.steps_done = 0
        self.anchor: torch.Tensor | None = None  # the last averaged model, flat
        self.comm_period = self.options.period
        self.group_state: CodecHookState | None = None
        if self.options.group_size:
            self.group_state = self._make_groups(self.options.group_size)
            self.comm_period = self.options.period * self.options.global_period

    def _make_groups(self, size: int) -> CodecHookState:
        world = self.context.world_size
        if world % size:
            raise ValueError(f"localsgd: group_size={size} does not divide the {world} workers")
        # Every rank creates every group (a collective call), then keeps its own.
        mine, _ = dist.new_subgroups(group_size=size, group=self.group)
        return CodecHookState(build_codec(CODECS.resolve("none")), self.meter, mine)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        if self.steps_done < self.options.warmup:
            self.steps_done += 1
            return super().step(inputs, targets)
        started = time.perf_counter()
        self.choose_codec(inputs, targets)
        if self.anchor is None:
            self.anchor = layout.flatten(self.model.parameters())  # torch.cat: storage of its own
        # Local step: no gradient all-reduce (nanoGPT's flag, rather than no_sync()).
        self.ddp.require_backward_grad_sync = False
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.recipe.gradients(lambda x, y: self.loss_fn(self.ddp(x), y), inputs, targets)
        self.recipe.step(self.optimizer, self.model.parameters())
        self.steps_done += 1
        local = self.steps_done - self.options.warmup
        if local % self.options.period == 0:
            if self.group_state is None or local % self.comm_period == 0:
                self._average()
            else:
                self._average_group()
        return self.stats(loss, started, len(targets))

    @torch.no_grad()
    def _average(self) -> None:
        params = list(self.model.parameters())
        delta = layout.flatten(params) - self.anchor
        mean_delta = exchange(self.hook_state, -1, delta, shapes=[p.shape for p in params])
        self.anchor += mean_delta
        layout.copy_into(params, self.anchor)

    @torch.no_grad()
    def _average_group(self) -> None:
        """The exact mean of the group's models; the global anchor stays as it is."""
        params = list(self.model.parameters())
        layout.copy_into(params, exchange(self.group_state, -2, layout.flatten(params)))

    def stop_margin(self) -> int:
        """Workers wait for each other only at averages: between them one can run a period ahead
        (hierarchical: a global period, K group averages)."""
        o = self.options
        return o.period * (o.global_period if o.group_size else 1) + 2

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = state.get("steps_done", 0)
        anchor = state.get("anchor")
        self.anchor = anchor.to(self.context.device) if anchor is not None else None
