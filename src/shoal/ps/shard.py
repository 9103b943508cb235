"""One parameter shard: its parameters, optimizer, version and policy.

A shard lives in one process (its rank's supervisor, :mod:`shoal.ps.host`)
and knows nothing of RPC or pipes: a push arrives as a decoded gradient, and
the shard's :class:`Policy` decides when it is applied and when its
:class:`Reply` is sent. Sparse training: the shard holds the masks, zeroes the
pruned entries of each gradient and of its parameters, and packs its replies
to the kept entries (:mod:`shoal.comm.layout`'s ``pack`` / ``unpack``).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.comm.layout import as_grads, flatten, pack, pieces, unpack
from shoal.parallel.partition import min_max_split
from shoal.engine.checkpoint import LatestSaver


def shard_layout(numels: list[int], shards: int) -> list[list[int]]:
    """Parameter indices per shard: contiguous runs minimising the largest shard (exact)."""
    if not 1 <= shards <= len(numels):
        raise ValueError(f"servers={shards}: must be between 1 and the model's {len(numels)} parameter tensors")
    return [list(part) for part in min_max_split(numels, shards)]


@dataclass
class Reply:
    """What a push gets back: the shard's parameters and what happened to the push."""

    params: torch.Tensor
    version: int
    staleness: int  # -1: the push was dropped (backup policy)
    stop: bool
    mask_version: int = 0  # > 0: params holds the kept entries of this mask version only
    mask: Any = None  # the mask (numpy bit-packed), when the worker has not seen this version


def done_future(value: Any) -> torch.futures.Future:
    """A future that already holds ``value`` (a reply sent at once)."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class Policy:
    """When a shard applies a push and when it answers; one object per shard.

    ``push`` is called with the shard unlocked and returns a future of the
    :class:`Reply`; ``finished`` hears that a worker took its last step
    (``None``: the job was told to stop), so that nobody waits for it.
    """

    dropped = 0  # pushes refused (backup: computed on parameters already replaced)

    def push(self, shard: ParameterShard, worker: int, version: int, clock: int, grad: torch.Tensor,
             lr: float) -> torch.futures.Future:
        raise NotImplementedError

    def finished(self, shard: ParameterShard, worker: int | None) -> None:
        """Nothing to release unless the policy holds replies back."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class ParameterShard:
    """One server's parameters, optimizer and bookkeeping (lives in one process)."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    codec: Any
    policy: Policy
    workers: int
    staleness_lr: bool = False
    version: int = 0
    stop: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    clocks: dict[int, float] = field(default_factory=dict)
    pushes: int = 0
    staleness_sum: int = 0
    mask_drops: int = 0  # pushes packed by a mask this shard no longer held
    checkpoint_every: int = 0  # versions between shard checkpoints; 0: none
    checkpoint_path: Path | None = None
    saver: LatestSaver | None = None  # writes them off the lock, newest first
    mask: torch.Tensor | None = None  # sparse training: flat, True keeps (over params, in order)
    mask_version: int = 0
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # versions some worker may still pack by
    told: dict[int, int] = field(default_factory=dict)  # worker -> the mask version its last reply carried
    mask_lock: threading.Lock = field(default_factory=threading.Lock)  # masks / told (replies may be sent under lock)

    def set_mask(self, mask: torch.Tensor | None, version: int) -> None:
        """A new mask (caller holds the lock): the pruned parameters go to zero now."""
        if mask is not None and mask.numel() != sum(p.numel() for p in self.params):
            raise ValueError(f"a mask of {mask.numel()} entries for a shard of "
                             f"{sum(p.numel() for p in self.params)} parameters")
        with self.mask_lock:
            self.mask, self.mask_version = (mask.bool() if mask is not None else None), version
            if self.mask is not None:
                self.masks[version] = self.mask
        self._zero_pruned()

    def unpack(self, grad: torch.Tensor, mask_version: int) -> torch.Tensor | None:
        """A push's gradient, packed by the mask of ``mask_version`` (0: dense), back to every
        entry; None when this shard no longer holds that mask (it was restarted since)."""
        if not mask_version:
            return grad
        with self.mask_lock:
            mask = self.masks.get(mask_version)
        if mask is None or int(mask.sum()) != grad.numel():
            return None
        return unpack(grad, mask)

    def pack(self, reply: Reply, worker: int, known: int) -> Reply:
        """The reply to ``worker``'s push, cut to the kept entries; the mask goes along
        unless the push was packed by it already (``known``: the push's mask version)."""
        with self.mask_lock:
            version, mask = self.mask_version, self.mask
            if mask is None:
                return reply
            if known != version:
                reply.mask = np.packbits(mask.numpy())
            self.told[worker] = version
            wanted = set(self.told.values()) | {version}
            self.masks = {v: m for v, m in self.masks.items() if v in wanted}
        reply.params, reply.mask_version = pack(reply.params, mask), version
        return reply

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        if self.mask is None:
            return
        for p, keep in zip(self.params, pieces(self.mask, self.params)):
            p.mul_(keep)

    def flat(self) -> torch.Tensor:
        return flatten(self.params)

    def reply(self, staleness: int) -> Reply:
        return Reply(self.flat(), self.version, staleness, self.stop)

    def apply(self, grad: torch.Tensor, lr: float, staleness: int) -> None:
        """One optimizer step with this gradient (caller holds the lock)."""
        scaled = lr / max(1, staleness) if self.staleness_lr else lr
        if self.mask is not None:
            grad = grad * self.mask  # the optimizer's moments see no gradient for a pruned weight
        as_grads(self.params, grad)
        for group in self.optimizer.param_groups:
            group["lr"] = scaled
        self.optimizer.step()
        self._zero_pruned()  # momentum or weight decay cannot revive a pruned weight
        self.version += 1
        self.pushes += 1
        self.staleness_sum += max(staleness, 0)
        if self.checkpoint_path is not None and self.checkpoint_every and self.version % self.checkpoint_every == 0:
            if self.saver is None:
                self.saver = LatestSaver(self.checkpoint_path)
            self.saver.submit(self.state_dict())  # a snapshot; written atomically on the saver's thread

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies, not views of the live tensors)."""
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "version": self.version, "policy": self.policy.state_dict(),
                "pushes": self.pushes, "staleness_sum": self.staleness_sum,
                "mask": self.mask.clone() if self.mask is not None else None, "mask_version": self.mask_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.pushes = state.get("pushes", self.pushes)
        self.staleness_sum = state.get("staleness_sum", self.staleness_sum)
        self.policy.load_state_dict(state.get("policy", {}))
        if state.get("mask") is not None:
            self.set_mask(state["mask"], state.get("mask_version", 1))
