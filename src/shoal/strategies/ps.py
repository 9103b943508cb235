"""Parameter-server training on PyTorch RPC: the machinery shared by
``async_ps``, ``ssp`` and ``sync:backup=b``.

The parameters are split into S shards of about equal size; shard j lives in
worker j's process (servers share their hosts with workers, as in MXNet's
co-located mode) and holds its parameters, its own optimizer and a version
counter. Every step each worker:

1. computes the gradient of its batch on its replica of the model
2. pushes each shard's slice to that shard's server (``rpc_async``), through
   the codec, with error feedback kept on the worker
3. gets back the shard's parameters and copies them into its replica

When a push is applied and when its reply is sent is the *policy*: ``async``
(apply on arrival, reply at once; Dean et al. 2012), ``ssp`` (apply on arrival,
hold the reply while the worker is more than s clocks ahead of the slowest; Ho
et al. 2013) or ``backup`` (apply the mean of the first N-b pushes of a version,
drop the rest; Chen et al. 2016). A policy is a small object; the shard and the
RPC plumbing are the same for all.

Processes: each rank is a supervising process (the elastic launcher's
worker) that hosts the rank's shard and RPC membership (:class:`PsHost`), and
a worker process it starts and restarts (``shoal.training.supervisor``). A
worker that dies is restarted and rejoins at its step count with the current
parameters while the others go on; a host that dies takes the launcher's
group restart, and its shard comes back from its last shard checkpoint.
PyTorch RPC's membership is fixed at start (a replacement cannot take a dead
member's place), which is why the part that may die and come back is kept
outside it.

Sparse training (``prune:``): the shards hold the masks. Rank 0's worker
ranks its replica and sends every shard its part (:meth:`PsHost.set_masks`);
a shard zeroes the pruned entries of each gradient before its optimizer step
and of its parameters after it, and keeps the mask in its checkpoints. Only
kept entries travel: a reply carries the shard's kept parameters (and, when
the mask changed since that worker last heard, the mask, bit-packed), and the
worker's next push carries the gradient of the entries that mask keeps, with
its version, so a shard decodes every push by the mask it was packed under.

Staleness of a push = versions the shard advanced between the worker's pull
and the push's application. Evaluation runs on rank 0 alone, on its replica as
of its last pull, so no worker ever waits for another to evaluate.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch import nn

from shoal.comm.codecs.base import Payload, build_codec, codecs_that
from shoal.comm.memory import ErrorFeedback
from shoal.parallel.partition import min_max_split
from shoal.strategies.base import StepStats, Strategy
from shoal.training.checkpoint import LatestSaver, load_checkpoint
from shoal.training.optim import build_optimizer

log = logging.getLogger(__name__)


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


@dataclass
class ParameterShard:
    """One server's parameters, optimizer and bookkeeping (lives in one process)."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    codec: Any
    policy: Any
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
        return grad.new_zeros(mask.numel()).masked_scatter_(mask, grad)

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
        reply.params, reply.mask_version = reply.params[mask], version
        return reply

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        if self.mask is None:
            return
        offset = 0
        for p in self.params:
            p.mul_(self.mask[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def reply(self, staleness: int) -> Reply:
        return Reply(self.flat(), self.version, staleness, self.stop)

    def apply(self, grad: torch.Tensor, lr: float, staleness: int) -> None:
        """One optimizer step with this gradient (caller holds the lock)."""
        scaled = lr / max(1, staleness) if self.staleness_lr else lr
        if self.mask is not None:
            grad = grad * self.mask  # the optimizer's moments see no gradient for a pruned weight
        offset = 0
        for p in self.params:
            p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
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


_SHARDS: dict[int, ParameterShard] = {}  # the shards this process serves, by id


def _done_future(value: Any) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


@rpc.functions.async_execution
def _push(shard_id: int, worker: int, version: int, clock: int, tensors: list[torch.Tensor],
          ctx: dict[str, Any], lr: float, mask_version: int = 0) -> torch.futures.Future:
    shard = _SHARDS[shard_id]
    grad = shard.unpack(shard.codec.decode(Payload(tensors, ctx)).reshape(-1).float(), mask_version)
    if grad is None:
        shard.mask_drops += 1
        log.warning("shard %d: dropped a push from worker %d packed by mask version %d, which it no longer holds",
                    shard_id, worker, mask_version)
        with shard.lock:
            return _done_future(shard.pack(shard.reply(-1), worker, mask_version))
    replied = shard.policy.push(shard, worker, version, clock, grad, lr)
    return replied.then(lambda f: shard.pack(f.value(), worker, mask_version))


def _finish(shard_id: int, worker: int) -> None:
    """A worker has taken its last step: policies stop waiting for it."""
    shard = _SHARDS[shard_id]
    shard.policy.finished(shard, worker)


def _request_stop(shard_id: int) -> None:
    shard = _SHARDS[shard_id]
    with shard.lock:
        shard.stop = True
    shard.policy.finished(shard, None)


def _set_mask(shard_id: int, mask: torch.Tensor) -> None:
    shard = _SHARDS[shard_id]
    with shard.lock:  # the shard numbers its masks: a restarted rank 0 counts from 1 again
        shard.set_mask(mask, shard.mask_version + 1)


def _pull(shard_id: int) -> Reply:
    shard = _SHARDS[shard_id]
    with shard.lock:
        return shard.reply(0)


def _stats(shard_id: int) -> tuple[int, int, int]:
    """Pushes applied, their total staleness, pushes dropped (backup policy)."""
    shard = _SHARDS[shard_id]
    return shard.pushes, shard.staleness_sum, getattr(shard.policy, "dropped", 0) + shard.mask_drops


def worker_name(rank: int) -> str:
    return f"shoal-{rank}"


def start_rpc(rank: int, world_size: int) -> None:
    """``init_rpc`` on a fresh TCP rendezvous that rank 0 hosts.

    Not ``env://``: under the elastic agent that is the job's long-lived store,
    and RPC's own key prefix restarts at 0 in every process, so a restarted
    group would read the dead one's addresses. Rank 0 picks a free port on the
    address it reaches the job's store from (the one the others can reach),
    and sends ``host:port`` to everyone over the process group.
    """
    endpoint: list[Any] = [None]
    if rank == 0:
        endpoint[0] = f"{_reachable_address()}:{_free_port()}"
    dist.broadcast_object_list(endpoint, src=0)
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{endpoint[0]}", num_worker_threads=max(8, 2 * world_size), rpc_timeout=600
    )
    # With this variable set, torch's tcp:// rendezvous assumes the agent hosts
    # every store and only connects: rank 0 would never start this one.
    agent_store = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        rpc.init_rpc(worker_name(rank), rank=rank, world_size=world_size, rpc_backend_options=options)
    finally:
        if agent_store is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = agent_store


def _reachable_address() -> str:
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(master), 9))  # no packet is sent: this picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PsHost:
    """The server side of a parameter-server job, in a rank's supervising process.

    It serves shard ``rank`` (when ``rank < servers``), is this rank's member of
    the RPC group, and forwards its worker's pushes and pulls. The worker runs
    in a child process (``shoal.training.supervisor``) and talks to it over a
    pipe, so a worker that dies takes neither the shard nor the RPC group with
    it: the others keep training, and a restarted worker rejoins through the
    same host. Shard ``j`` is written to ``OUT/shards/shard{j}.pt`` (atomic,
    checksummed) every ``checkpoint_every`` versions; a host restarted after
    its process died loads it.
    """

    def __init__(self, strategy: type[PsStrategy], cfg: Any, context: Any, model: nn.Module, *,
                 restore_shard: bool = False, fresh: bool = False, worker_restarts: Any = None):
        self.worker_restarts = worker_restarts  # () -> the job's worker restarts so far
        self.context = context
        options = cfg.strategy.options
        self.servers = strategy.server_count(options)
        strategy.check(options, cfg.codec, context.world_size)
        params = [p for p in model.parameters() if p.requires_grad]
        self.layout = shard_layout([p.numel() for p in params], self.servers)
        self.shard: ParameterShard | None = None
        self.shard_path = Path(cfg.out) / "shards" / f"shard{context.rank}.pt"
        self.restored_version: int | None = None
        if context.rank < self.servers:
            shard_params = [params[i].detach().clone() for i in self.layout[context.rank]]
            optimizer = build_optimizer(cfg.optimizer, shard_params)
            self.shard = ParameterShard(
                params=shard_params,
                optimizer=optimizer,
                codec=build_codec(cfg.codec, rank=context.rank),
                policy=strategy.make_policy(options, context.world_size),
                workers=context.world_size,
                staleness_lr=getattr(options, "staleness_lr", False),
                checkpoint_every=cfg.train.checkpoint_every,
                checkpoint_path=self.shard_path,
            )
            if fresh:
                self.shard_path.unlink(missing_ok=True)  # an earlier run's, in the same directory
            if restore_shard and self.shard_path.is_file():
                self.shard.load_state_dict(load_checkpoint(self.shard_path))  # checksum verified
                self.restored_version = self.shard.version
            _SHARDS[context.rank] = self.shard
        # Workers finish far apart when one is slow: the final wait gets its own
        # group with no practical timeout (the default group's is 10 minutes).
        self.wait_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        start_rpc(context.rank, context.world_size)
        dist.barrier()  # every shard exists before the first push

    def push(self, pushes: list[tuple[list[torch.Tensor], dict[str, Any]]], worker: int, versions: list[int],
             clock: int, lr: float, mask_versions: list[int] | None = None) -> list[Reply]:
        masks = mask_versions or [0] * len(pushes)
        futures = [
            rpc.rpc_async(worker_name(shard), _push,
                          args=(shard, worker, versions[shard], clock, tensors, ctx, lr, masks[shard]))
            for shard, (tensors, ctx) in enumerate(pushes)
        ]
        return [f.wait() for f in futures]

    def pull(self) -> list[Reply]:
        return [rpc.rpc_sync(worker_name(shard), _pull, args=(shard,)) for shard in range(self.servers)]

    def set_masks(self, masks: list[torch.Tensor]) -> None:
        """Sparse training: every shard's part of the masks (flat, in its parameters' order)."""
        futures = [rpc.rpc_async(worker_name(shard), _set_mask, args=(shard, mask))
                   for shard, mask in enumerate(masks)]
        for f in futures:
            f.wait()

    def request_stop(self) -> None:
        for shard in range(self.servers):
            rpc.rpc_sync(worker_name(shard), _request_stop, args=(shard,))

    def close(self, worker: int) -> tuple[list[Reply], dict[str, float]]:
        """The worker is done: wait for every worker, then (rank 0) pull the
        final model and the servers' totals; leave RPC."""
        for shard in range(self.servers):
            rpc.rpc_sync(worker_name(shard), _finish, args=(shard, worker))
        dist.barrier(group=self.wait_group)  # nobody leaves while a server may still owe a reply
        replies: list[Reply] = []
        totals: dict[str, float] = {}
        if self.context.rank == 0:
            replies = self.pull()
            stats = [rpc.rpc_sync(worker_name(s), _stats, args=(s,)) for s in range(self.servers)]
            pushes = sum(p for p, _, _ in stats)
            totals = {"updates": pushes / self.servers,
                      "mean_staleness": sum(s for _, s, _ in stats) / max(pushes, 1),
                      "dropped_pushes": sum(d for _, _, d in stats) / self.servers}
            if self.worker_restarts is not None:
                totals["worker_restarts"] = self.worker_restarts()
        rpc.shutdown()
        if self.shard is not None and self.shard.saver is not None:
            self.shard.saver.flush()  # the last shard checkpoint is on disk before the process ends
        return replies, totals

    def shard_state(self) -> dict[str, Any] | None:
        if self.shard is None:
            return None
        with self.shard.lock:
            return self.shard.state_dict()

    def load_shard_state(self, state: dict[str, Any] | None, versions: list[int]) -> None:
        """Restore the shard from a run checkpoint (or, without saved server
        state, serve the restored model at the workers' version)."""
        if self.shard is None:
            return
        with self.shard.lock:
            if state:
                self.shard.load_state_dict(state)
            else:
                self.shard.version = versions[self.context.rank]

    def load_shard_params(self, flat: torch.Tensor) -> None:
        if self.shard is None:
            return
        with self.shard.lock, torch.no_grad():
            offset = 0
            for p in self.shard.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


class PsStrategy(Strategy):
    """Worker side of a parameter-server strategy; subclasses give the policy.

    Runs in the worker process under ``shoal.training.supervisor``: the
    gradient, the codec and its error feedback are computed here, and
    :class:`PsHost` in the supervising process sends them to the shards.
    """

    collective_eval = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        self.servers = self.server_count(self.options)  # checked by the supervisor's PsHost, before this started
        if _LINK is None:
            raise RuntimeError(f"{type(self).__name__} runs under shoal's worker supervisor (shoal train / shoal.train)")
        self.link = _LINK
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
    def make_policy(cls, options: Any, workers: int) -> Any:
        raise NotImplementedError

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        started = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        compute_s = time.perf_counter() - started
        lr = self.optimizer.param_groups[0]["lr"]
        self.clock += 1
        pushes, wire, dense = [], 0, 0
        for shard, indices in enumerate(self.layout):
            grad = torch.cat([self.params[i].grad.reshape(-1) for i in indices])
            dense += grad.numel() * 4
            keep = self.shard_masks[shard][1]
            if keep is not None:
                grad = grad[keep]  # the pruned entries' gradients are not sent
            compensated = self.memory.compensate(shard, grad) if self.memory is not None else grad
            payload = self.codec.encode(compensated)
            if self.memory is not None:
                self.memory.update(shard, compensated, self.codec.decode(payload).reshape(-1))
            wire += payload.wire_bytes
            pushes.append(([t.cpu() for t in payload.tensors], payload.ctx))  # the servers hold CPU tensors
        replies = self.link.call("ps", "push", pushes, self.context.rank, list(self.versions), self.clock, lr,
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
            numel = sum(self.params[i].numel() for i in self.layout[shard])
            keep = torch.from_numpy(np.unpackbits(reply.mask, count=numel).astype(bool)).to(self.params[0].device)
            old = self.shard_masks[shard][1]
            if self.memory is not None:  # the residual follows the packing
                self.memory.repack(shard, old.nonzero().squeeze(1) if old is not None else None,
                                   keep.nonzero().squeeze(1), numel)
            self.shard_masks[shard] = (reply.mask_version, keep)
        if reply.mask_version:
            keep = self.shard_masks[shard][1].to(params.device)
            params = params.new_zeros(keep.numel()).masked_scatter_(keep, params)
        offset = 0
        for i in self.layout[shard]:
            p = self.params[i]
            p.copy_(params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.versions[shard] = reply.version

    def finished(self) -> bool:
        return self.stopped

    def use_masks(self, masks: Any) -> None:
        """The shards enforce the masks: rank 0 decides them and sends them on;
        every other worker's replica gets the zeros with the parameters it pulls."""
        if self.context.rank == 0:
            masks.publish = lambda: self._publish_masks(masks)
        else:
            masks.follower = True

    def _publish_masks(self, masks: Any) -> None:
        flat = [masks.flat_mask([self.params[i] for i in indices]).cpu() for indices in self.layout]
        self.link.call("ps", "set_masks", flat)

    def request_stop(self) -> None:
        self.link.call("ps", "request_stop")

    def pull(self) -> None:
        """Bring the replica up to the servers' current parameters."""
        for shard, reply in enumerate(self.link.call("ps", "pull")):
            self._load(shard, reply)

    def progress(self, counters: dict[str, Any]) -> None:
        self.link.tell("progress", counters)

    def kill_server(self) -> None:
        self.link.tell("die")
        time.sleep(600)  # the supervisor kills this process with itself

    def rejoin(self, steps_done: int) -> None:
        """A restarted worker: continue at its step count from the servers' parameters."""
        self.clock = steps_done
        self.pull()

    def close(self) -> dict[str, float]:
        """Tell the servers this worker is done, wait for everyone, leave RPC.

        Returns the servers' totals (pushes applied, mean staleness) on rank 0."""
        replies, totals = self.link.call("ps", "close", self.context.rank)
        for shard, reply in enumerate(replies):
            self._load(shard, reply)
        return totals

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "versions": list(self.versions),
                "memory": self.memory.state_dict() if self.memory else {},
                "shard_masks": [(v, k.cpu() if k is not None else None) for v, k in self.shard_masks],
                "shard": self.link.call("ps", "shard_state")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock = state.get("clock", 0)
        self.versions = list(state.get("versions", self.versions))
        if len(state.get("shard_masks", [])) == self.servers:  # the packing the saved residuals are in
            device = self.params[0].device
            self.shard_masks = [(v, k.to(device) if k is not None else None) for v, k in state["shard_masks"]]
        if self.memory is not None:
            self.memory.load_state_dict(state.get("memory", {}))
        if state.get("shard"):
            self.link.call("ps", "load_shard_state", state["shard"], self.versions)
        elif self.context.rank < self.servers:
            # No server state saved: serve the restored model, at the workers' version.
            flat = torch.cat([self.params[i].detach().cpu().reshape(-1) for i in self.layout[self.context.rank]])
            self.link.call("ps", "load_shard_params", flat)
            self.link.call("ps", "load_shard_state", None, self.versions)


_LINK: Any = None  # the worker process's pipe to its supervisor (shoal.training.supervisor)


def set_link(link: Any) -> None:
    global _LINK
    _LINK = link


def parameter_server_class(component: Any) -> type[PsStrategy] | None:
    """The :class:`PsStrategy` subclass a strategy spec resolves to, else None
    (a factory such as ``sync`` says through its ``resolve`` attribute)."""
    target = component.target
    resolve = getattr(target, "resolve", None)
    cls = resolve(component.options) if resolve is not None else target
    return cls if isinstance(cls, type) and issubclass(cls, PsStrategy) else None
