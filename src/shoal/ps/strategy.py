"""The worker side of a parameter-server strategy (``async_ps``, ``ssp``, ``sync:backup=b``).

It runs in the worker process under :mod:`shoal.ps.supervisor` and reaches
the shards through the :class:`~shoal.ps.proxy.SupervisorProxy` it is built
with. Every step it

1. computes the gradient of its batch on its replica of the model
2. cuts it into the shards' slices (:func:`~shoal.ps.shard.shard_layout`),
   encodes each through the codec, with error feedback kept here, and pushes
   them all (the supervisor's host sends them on over RPC)
3. copies every shard's reply, its current parameters, into the replica.

Sparse training: a reply packed by a mask carries only the kept entries (and
the mask itself when it is new to this worker); the next push sends only the
gradient of the entries that mask keeps, and says which mask version packed it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from shoal.comm.codecs.base import build_codec, codecs_that
from shoal.comm.layout import copy_into, flatten, pack, unpack
from shoal.comm.memory import ErrorFeedback
from shoal.ps.shard import Policy, Reply, shard_layout
from shoal.registry import TOPOLOGIES, Component, load_builtins
from shoal.strategies.base import StepStats, Strategy

if TYPE_CHECKING:
    from shoal.ps.proxy import SupervisorProxy


class PsStrategy(Strategy):
    """Worker side of a parameter-server strategy; subclasses give the policy."""

    collective_eval = False
    # The servers take the optimizer step: no gradient scaler here, so bf16 but not fp16.
    recipe_support = frozenset({"precision", "accumulate", "clip_grad_norm"})
    precisions = ("bf16",)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 supervisor: SupervisorProxy | None = None, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        self.servers = self.server_count(self.options)  # checked by the supervisor's PsHost, before this started
        if supervisor is None:
            raise RuntimeError(f"{type(self).__name__} runs under shoal's worker supervisor (shoal train / shoal.train)")
        self.supervisor = supervisor
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layout = shard_layout([p.numel() for p in self.params], self.servers)
        self.codec = build_codec(self.codec_spec, rank=self.context.rank)
        self.memory = ErrorFeedback() if self.codec.options.memory == "ef" else None
        self.versions = [0] * self.servers
        self.clock = 0
        self.stopped = False
        # Sparse training: per shard, the mask version its replies are packed by and the kept entries.
        self.shard_masks: list[tuple[int, torch.Tensor | None]] = [(0, None)] * self.servers

    @classmethod
    def server_count(cls, options: Any) -> int:
        return options.servers

    @classmethod
    def check(cls, options: Any, codec: Any, world_size: int) -> None:
        """Refuse what this strategy cannot run (before any process is started)."""
        if not codec.target.capabilities.standalone:
            raise ValueError(f"codec {codec.name!r} cannot be decoded by a parameter server; "
                             f"allowed: {', '.join(codecs_that('standalone'))}")

    @classmethod
    def make_policy(cls, options: Any, workers: int) -> Policy:
        raise NotImplementedError

    def _shard_params(self, shard: int) -> list[torch.Tensor]:
        return [self.params[i] for i in self.layout[shard]]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        started = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss = self.recipe.gradients(lambda x, y: self.loss_fn(self.model(x), y), inputs, targets)
        self.recipe.clip(self.params)  # each worker's gradient, before its push
        compute_s = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        self.clock += 1
        pushes, wire, dense = [], 0, 0
        for shard in range(self.servers):
            grad = flatten([p.grad for p in self._shard_params(shard)])
            dense += grad.numel() * 4
            grad = pack(grad, self.shard_masks[shard][1])  # the pruned entries' gradients are not sent
            compensated = self.memory.compensate(shard, grad) if self.memory is not None else grad
            payload = self.codec.encode(compensated)
            if self.memory is not None:
                self.memory.update(shard, compensated, self.codec.decode(payload).reshape(-1))
            wire += payload.wire_bytes
            pushes.append(([t.cpu() for t in payload.tensors], payload.ctx))  # the servers hold CPU tensors
        replies = self.supervisor.push(pushes, self.context.rank, list(self.versions), self.clock, lr,
                                       [version for version, _ in self.shard_masks])
        staleness = [r.staleness for r in replies if r.staleness >= 0]
        for shard, reply in enumerate(replies):
            self._load(shard, reply)
            wire += reply.params.numel() * 4 + (reply.mask.nbytes if reply.mask is not None else 0)
        self.stopped = any(r.stop for r in replies)
        return StepStats(
            loss=loss.item(), compute_s=compute_s, comm_s=time.perf_counter() - started - compute_s,
            wire_bytes=wire, dense_bytes=2 * dense, samples=len(targets),
            staleness=sum(staleness) / len(staleness) if staleness else None,
        )

    @torch.no_grad()
    def _load(self, shard: int, reply: Reply) -> None:
        params = reply.params
        if reply.mask is not None:  # a new mask: later pushes are packed by it
            numel = sum(p.numel() for p in self._shard_params(shard))
            keep = torch.from_numpy(np.unpackbits(reply.mask, count=numel).astype(bool)).to(self.params[0].device)
            old = self.shard_masks[shard][1]
            if self.memory is not None:  # the residual follows the packing
                self.memory.repack(shard, old.nonzero().squeeze(1) if old is not None else None,
                                   keep.nonzero().squeeze(1), numel)
            self.shard_masks[shard] = (reply.mask_version, keep)
        if reply.mask_version:
            params = unpack(params, self.shard_masks[shard][1].to(params.device))
        copy_into(self._shard_params(shard), params)
        self.versions[shard] = reply.version

    def finished(self) -> bool:
        return self.stopped

    # The shards enforce the masks: rank 0 decides them and sends them on; every
    # other worker's replica gets the zeros with the parameters it pulls.
    def holds_masks(self) -> bool:
        return self.context.rank == 0

    def masks_changed(self, masks: Any) -> None:
        self.supervisor.set_masks([masks.flat_mask(self._shard_params(shard)).cpu() for shard in range(self.servers)])

    def request_stop(self) -> None:
        self.supervisor.request_stop()

    def pull(self) -> None:
        """Bring the replica up to the servers' current parameters."""
        for shard, reply in enumerate(self.supervisor.pull()):
            self._load(shard, reply)

    def progress(self, counters: dict[str, Any]) -> None:
        self.supervisor.progress(counters)

    def kill_server(self) -> None:
        self.supervisor.die()
        time.sleep(600)  # the supervisor kills this process with itself

    def rejoin(self, steps_done: int) -> None:
        """A restarted worker: continue at its step count from the servers' parameters."""
        self.clock = steps_done
        self.pull()

    def close(self) -> dict[str, float]:
        """Tell the servers this worker is done, wait for everyone, leave RPC.

        Returns the servers' totals (pushes applied, mean staleness) on rank 0."""
        replies, totals = self.supervisor.close(self.context.rank)
        for shard, reply in enumerate(replies):
            self._load(shard, reply)
        return totals

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "versions": list(self.versions),
                "memory": self.memory.state_dict() if self.memory else {},
                "shard_masks": [(v, k.cpu() if k is not None else None) for v, k in self.shard_masks],
                "shard": self.supervisor.shard_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock = state.get("clock", 0)
        self.versions = list(state.get("versions", self.versions))
        if len(state.get("shard_masks", [])) == self.servers:  # the packing the saved residuals are in
            device = self.params[0].device
            self.shard_masks = [(v, k.to(device) if k is not None else None) for v, k in state["shard_masks"]]
        if self.memory is not None:
            self.memory.load_state_dict(state.get("memory", {}))
        if state.get("shard"):
            self.supervisor.load_shard_state(state["shard"], self.versions)
        elif self.context.rank < self.servers:
            # No server state saved: serve the restored model, at the workers' version.
            self.supervisor.load_shard_params(flatten(self._shard_params(self.context.rank)).cpu())
            self.supervisor.load_shard_state(None, self.versions)


def parameter_server_class(component: Component) -> type[PsStrategy] | None:
    """The :class:`PsStrategy` subclass a strategy spec runs as, else None: the
    registered class itself, or the topology it names (:meth:`Strategy.topology`)."""
    name = component.target.topology(component.options)
    if name is not None:
        load_builtins(TOPOLOGIES)
        cls = TOPOLOGIES.target(name)
    else:
        cls = component.target
    return cls if issubclass(cls, PsStrategy) else None
