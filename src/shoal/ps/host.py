"""The server side of a parameter-server job: RPC functions, rendezvous, :class:`PsHost`.

Every rank's supervising process is a member of one PyTorch RPC group; shard
j lives in rank j's. A worker's push reaches the shard's process as
``rpc_async(worker_name(j), _push, ...)``, and the function there looks the
shard up in :data:`SERVED`, decodes the push and hands it to the shard's
policy. PyTorch RPC's membership is fixed at start (a replacement cannot take
a dead member's place), which is why the worker, the part that may die and
come back, is kept outside it (:mod:`shoal.ps.supervisor`).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch import nn

from shoal.comm.codecs.base import Payload, build_codec
from shoal.comm.layout import copy_into
from shoal.ps.shard import ParameterShard, Reply, done_future, shard_layout
from shoal.engine.checkpoint import load_checkpoint
from shoal.engine.optim import build_optimizer

if TYPE_CHECKING:
    from shoal.ps.strategy import PsStrategy

log = logging.getLogger(__name__)


class ShardTable:
    """The shards this process serves, by id.

    PyTorch RPC runs a remote function by its qualified name in the callee's
    process, with no object to call it on, so the functions below find their
    shard here: one table per process, :data:`SERVED`, which :class:`PsHost`
    fills and nothing else writes.
    """

    def __init__(self) -> None:
        self._shards: dict[int, ParameterShard] = {}

    def serve(self, shard_id: int, shard: ParameterShard) -> None:
        self._shards[shard_id] = shard

    def __getitem__(self, shard_id: int) -> ParameterShard:
        shard = self._shards.get(shard_id)
        if shard is None:
            raise KeyError(f"shard {shard_id} is not served by this process (it serves {sorted(self._shards)})")
        return shard


SERVED = ShardTable()


@rpc.functions.async_execution
def _push(shard_id: int, worker: int, version: int, clock: int, tensors: list[torch.Tensor],
          ctx: dict[str, Any], lr: float, mask_version: int = 0) -> torch.futures.Future:
    shard = SERVED[shard_id]
    grad = shard.unpack(shard.codec.decode(Payload(tensors, ctx)).reshape(-1).float(), mask_version)
    if grad is None:
        shard.mask_drops += 1
        log.warning("shard %d: dropped a push from worker %d packed by mask version %d, which it no longer holds",
                    shard_id, worker, mask_version)
        with shard.lock:
            return done_future(shard.pack(shard.reply(-1), worker, mask_version))
    replied = shard.policy.push(shard, worker, version, clock, grad, lr)
    return replied.then(lambda f: shard.pack(f.value(), worker, mask_version))


def _finish(shard_id: int, worker: int) -> None:
    """A worker has taken its last step: policies stop waiting for it."""
    shard = SERVED[shard_id]
    shard.policy.finished(shard, worker)


def _request_stop(shard_id: int) -> None:
    shard = SERVED[shard_id]
    with shard.lock:
        shard.stop = True
    shard.policy.finished(shard, None)


def _set_mask(shard_id: int, mask: torch.Tensor) -> None:
    shard = SERVED[shard_id]
    with shard.lock:  # the shard numbers its masks: a restarted rank 0 counts from 1 again
        shard.set_mask(mask, shard.mask_version + 1)


def _pull(shard_id: int) -> Reply:
    shard = SERVED[shard_id]
    with shard.lock:
        return shard.reply(0)


def _stats(shard_id: int) -> tuple[int, int, int]:
    """Pushes applied, their total staleness, pushes dropped (backup policy, stale masks)."""
    shard = SERVED[shard_id]
    return shard.pushes, shard.staleness_sum, shard.policy.dropped + shard.mask_drops


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
    in a child process (:mod:`shoal.ps.supervisor`) and talks to it over a
    pipe, so a worker that dies takes neither the shard nor the RPC group with
    it: the others keep training, and a restarted worker rejoins through the
    same host. Shard ``j`` is written to ``OUT/shards/shard{j}.pt`` (atomic,
    checksummed) every ``checkpoint_every`` versions; a host restarted after
    its process died loads it.
    """

    def __init__(self, strategy: type[PsStrategy], cfg: Any, context: Any, model: nn.Module, *,
                 restore_shard: bool = False, fresh: bool = False,
                 worker_restarts: Callable[[], int] | None = None):
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
            SERVED.serve(context.rank, self.shard)
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
        with self.shard.lock:
            copy_into(self.shard.params, flat)
