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

Staleness of a push = versions the shard advanced between the worker's pull
and the push's application. Evaluation runs on rank 0 alone, on its replica as
of its last pull, so no worker ever waits for another to evaluate.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch import nn

from shoal.comm.codecs.base import Payload, build_codec
from shoal.comm.memory import ErrorFeedback
from shoal.strategies.base import StepStats, Strategy

# Codecs whose decode needs nothing but the payload (no shared random stream,
# no extra rounds): those a server can decode alone.
PUSHABLE_CODECS = {"none", "fp16", "bf16", "int8", "qsgd", "terngrad", "signsgd", "topk"}


def shard_layout(numels: list[int], shards: int) -> list[list[int]]:
    """Parameter indices per shard: contiguous runs minimising the largest shard
    (exact, by dynamic programming over split points; models have at most a
    few hundred tensors)."""
    n = len(numels)
    if not 1 <= shards <= n:
        raise ValueError(f"servers={shards}: must be between 1 and the model's {n} parameter tensors")
    prefix = [0]
    for size in numels:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # cost[k][i]: the largest shard when the first i tensors make k shards; cut[k][i]: where the last one starts
    cost = [[inf] * (n + 1) for _ in range(shards + 1)]
    cut = [[0] * (n + 1) for _ in range(shards + 1)]
    cost[0][0] = 0
    for k in range(1, shards + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                candidate = max(cost[k - 1][j], prefix[i] - prefix[j])
                if candidate < cost[k][i]:
                    cost[k][i], cut[k][i] = candidate, j
    layout, end = [], n
    for k in range(shards, 0, -1):
        start = cut[k][end]
        layout.append(list(range(start, end)))
        end = start
    return layout[::-1]


@dataclass
class Reply:
    """What a push gets back: the shard's parameters and what happened to the push."""

    params: torch.Tensor
    version: int
    staleness: int  # -1: the push was dropped (backup policy)
    stop: bool


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

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def reply(self, staleness: int) -> Reply:
        return Reply(self.flat(), self.version, staleness, self.stop)

    def apply(self, grad: torch.Tensor, lr: float, staleness: int) -> None:
        """One optimizer step with this gradient (caller holds the lock)."""
        scaled = lr / max(1, staleness) if self.staleness_lr else lr
        offset = 0
        for p in self.params:
            p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for group in self.optimizer.param_groups:
            group["lr"] = scaled
        self.optimizer.step()
        self.version += 1
        self.pushes += 1
        self.staleness_sum += max(staleness, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "version": self.version, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.policy.load_state_dict(state.get("policy", {}))


_SHARDS: dict[int, ParameterShard] = {}  # the shards this process serves, by id


def _done_future(value: Any) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


@rpc.functions.async_execution
def _push(shard_id: int, worker: int, version: int, clock: int, tensors: list[torch.Tensor],
          ctx: dict[str, Any], lr: float) -> torch.futures.Future:
    shard = _SHARDS[shard_id]
    grad = shard.codec.decode(Payload(tensors, ctx)).reshape(-1).float()
    return shard.policy.push(shard, worker, version, clock, grad, lr)


def _finish(shard_id: int, worker: int) -> None:
    """A worker has taken its last step: policies stop waiting for it."""
    shard = _SHARDS[shard_id]
    shard.policy.finished(shard, worker)


def _request_stop(shard_id: int) -> None:
    shard = _SHARDS[shard_id]
    with shard.lock:
        shard.stop = True
    shard.policy.finished(shard, None)


def _pull(shard_id: int) -> Reply:
    shard = _SHARDS[shard_id]
    with shard.lock:
        return shard.reply(0)


def _stats(shard_id: int) -> tuple[int, int, int]:
    """Pushes applied, their total staleness, pushes dropped (backup policy)."""
    shard = _SHARDS[shard_id]
    return shard.pushes, shard.staleness_sum, getattr(shard.policy, "dropped", 0)


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


class PsStrategy(Strategy):
    """Worker side of a parameter-server strategy; subclasses give the policy."""

    collective_eval = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        ctx = self.context
        if self.codec_spec.name not in PUSHABLE_CODECS:
            raise ValueError(f"codec {self.codec_spec.name!r} cannot be decoded by a parameter server; "
                             f"allowed: {', '.join(sorted(PUSHABLE_CODECS))}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layout = shard_layout([p.numel() for p in self.params], self.servers)
        self.codec = build_codec(self.codec_spec, rank=ctx.rank)
        self.memory = ErrorFeedback() if self.codec.options.memory == "ef" else None
        self.versions = [0] * self.servers
        self.clock = 0
        self.stopped = False
        if ctx.rank < self.servers:
            shard_params = [self.params[i].detach().clone() for i in self.layout[ctx.rank]]
            _SHARDS[ctx.rank] = ParameterShard(
                params=shard_params,
                optimizer=type(optimizer)(shard_params, **optimizer.defaults),
                codec=build_codec(self.codec_spec, rank=ctx.rank),
                policy=self.make_policy(),
                workers=ctx.world_size,
                staleness_lr=getattr(self.options, "staleness_lr", False),
            )
        # Workers finish far apart when one is slow: the final wait gets its own
        # group with no practical timeout (the default group's is 10 minutes).
        self.wait_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        start_rpc(ctx.rank, ctx.world_size)
        dist.barrier()  # every shard exists before the first push

    servers: int = 1

    def make_policy(self) -> Any:
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
        futures, wire, dense = [], 0, 0
        for shard, indices in enumerate(self.layout):
            grad = torch.cat([self.params[i].grad.reshape(-1) for i in indices])
            compensated = self.memory.compensate(shard, grad) if self.memory is not None else grad
            payload = self.codec.encode(compensated)
            if self.memory is not None:
                self.memory.update(shard, compensated, self.codec.decode(payload).reshape(-1))
            wire += payload.wire_bytes
            dense += grad.numel() * 4
            futures.append(rpc.rpc_async(
                worker_name(shard), _push,
                args=(shard, self.context.rank, self.versions[shard], self.clock, payload.tensors, payload.ctx, lr),
            ))
        replies = [f.wait() for f in futures]
        staleness = [r.staleness for r in replies if r.staleness >= 0]
        for shard, reply in enumerate(replies):
            self._load(shard, reply)
            wire += reply.params.numel() * 4
        self.stopped = any(r.stop for r in replies)
        return StepStats(
            loss=loss.item(), compute_s=compute_s, comm_s=time.perf_counter() - started - compute_s,
            wire_bytes=wire, dense_bytes=2 * dense, samples=len(targets),
            staleness=sum(staleness) / len(staleness) if staleness else None,
        )

    @torch.no_grad()
    def _load(self, shard: int, reply: Reply) -> None:
        offset = 0
        for i in self.layout[shard]:
            p = self.params[i]
            p.copy_(reply.params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.versions[shard] = reply.version

    def finished(self) -> bool:
        return self.stopped

    def request_stop(self) -> None:
        for shard in range(self.servers):
            rpc.rpc_sync(worker_name(shard), _request_stop, args=(shard,))

    def pull(self) -> None:
        """Bring the replica up to the servers' current parameters."""
        for shard in range(self.servers):
            self._load(shard, rpc.rpc_sync(worker_name(shard), _pull, args=(shard,)))

    def close(self) -> dict[str, float]:
        """Tell the servers this worker is done, wait for everyone, leave RPC.

        Returns the servers' totals (pushes applied, mean staleness) on rank 0."""
        for shard in range(self.servers):
            rpc.rpc_sync(worker_name(shard), _finish, args=(shard, self.context.rank))
        totals: dict[str, float] = {}
        dist.barrier(group=self.wait_group)  # nobody leaves while a server may still owe a reply
        if self.context.rank == 0:
            self.pull()
            stats = [rpc.rpc_sync(worker_name(s), _stats, args=(s,)) for s in range(self.servers)]
            pushes = sum(p for p, _, _ in stats)
            totals = {"updates": pushes / self.servers,
                      "mean_staleness": sum(s for _, s, _ in stats) / max(pushes, 1),
                      "dropped_pushes": sum(d for _, _, d in stats) / self.servers}
        rpc.shutdown()
        return totals  # the shard stays in _SHARDS: the final checkpoint saves it

    def state_dict(self) -> dict[str, Any]:
        shard = _SHARDS.get(self.context.rank)
        return {"clock": self.clock, "versions": list(self.versions),
                "memory": self.memory.state_dict() if self.memory else {},
                "shard": shard.state_dict() if shard is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock = state.get("clock", 0)
        self.versions = list(state.get("versions", self.versions))
        if self.memory is not None:
            self.memory.load_state_dict(state.get("memory", {}))
        shard = _SHARDS.get(self.context.rank)
        if shard is not None and state.get("shard"):
            shard.load_state_dict(state["shard"])
        elif shard is not None:
            # No server state saved: serve the restored model, at the workers' version.
            with torch.no_grad():
                for p, i in zip(shard.params, self.layout[self.context.rank]):
                    p.copy_(self.params[i])
            shard.version = self.versions[self.context.rank]
