"""Per-process entry point: join the process group, train, leave.

``shoal train`` starts one of these per worker through PyTorch's elastic
launcher. Across machines, start them with ``torchrun`` directly::

    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=job1 \\
        -m shoal.worker examples/mnist1d.yaml --out runs/two-nodes

The worker reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the store
address from the environment the launcher sets.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from shoal.config import ConfigError, RunConfig, load_config, validate_config
from shoal.engine.stop import GracefulStop
from shoal.netem.slowdown import Slowdown
from shoal.ps.strategy import parameter_server_class
from shoal.ps.supervisor import RESTARTS_KEY, supervise
from shoal.strategies.base import WorkerContext


def nccl_shortfall(local_workers: int) -> str | None:
    """Why NCCL cannot run ``local_workers`` workers on this node, or None if it can."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= local_workers:
        return None
    return (f"backend: nccl needs one GPU per worker; {local_workers} workers on this node, {gpus} GPU(s) "
            "(allowed: backend gloo or auto, or fewer workers)")


def pick_backend(cfg: RunConfig) -> str:
    """``auto``: NCCL on GPUs when this node has one for each of its workers, else gloo on CPUs."""
    shortfall = nccl_shortfall(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.backend == "nccl" and shortfall:
        raise ValueError(shortfall)
    if cfg.backend != "auto":
        return cfg.backend
    return "gloo" if shortfall else "nccl"


def _init_process_group(backend: str, timeout: timedelta) -> tuple[int, dist.Store]:
    """``init_process_group`` from the launcher's environment, one key space per
    attempt; returns the job-wide attempt number (0 = first start).

    Under the elastic agent's c10d rendezvous the workers share the agent's
    TCPStore, and a restarted group gets the same store back: without a
    per-attempt prefix the new ranks read the dead ranks' gloo addresses and
    fail to connect. The attempt cannot be the agent's TORCHELASTIC_RESTART_COUNT:
    that counts per node, and a node restarted only because another node's
    worker failed (a membership change) does not count it. Instead each rank
    counts its own starts in the store, which lives as long as the job: every
    attempt starts every rank once, so all ranks of an attempt agree.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    attempt = store.add(f"shoal/starts/rank{rank}", 1) - 1
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"shoal/attempt_{attempt}", store), rank=rank, world_size=world_size,
        timeout=timeout,
    )
    return attempt, store


def check_restart_budget(attempt: int, worker_restarts: int = 0) -> None:
    """The launcher's ``--max-restarts`` holds for the whole job, not per node:
    each node's agent has its own budget, so a job of several nodes could
    otherwise restart several times that. Single workers restarted under a
    supervisor (parameter-server strategies) count against the same budget."""
    budget = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if attempt + worker_restarts > budget:
        raise RuntimeError(f"restart budget spent: this would be restart {attempt + worker_restarts} of the job, "
                           f"--max-restarts allows {budget}")


def cpu_threads() -> int:
    """Intra-op threads for a CPU worker: the node's cores shared among its workers.

    ``SHOAL_NUM_THREADS`` overrides it, for when several "nodes" share one
    machine (the emulated cluster), where LOCAL_WORLD_SIZE undercounts.
    """
    if os.environ.get("SHOAL_NUM_THREADS"):
        return max(1, int(os.environ["SHOAL_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@record
def worker_main(config: dict[str, Any], resume: bool = False) -> dict[str, Any] | None:
    """Run one worker of a job; rank 0 returns the summary as a dict."""
    # From the start: a SIGINT/SIGTERM while the worker starts up stops it at its first step boundary.
    with GracefulStop() as stop:
        return _worker_main(config, resume, stop)


def _worker_main(config: dict[str, Any], resume: bool, stop: GracefulStop) -> dict[str, Any] | None:
    cfg = validate_config(config)
    backend = pick_backend(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads())
    attempt, store = _init_process_group(backend, timeout=timedelta(minutes=10))
    stop.store, stop.key = store, f"shoal/stop_after/attempt_{attempt}"
    # No teardown on an error: the process exits at once, and the launcher sees
    # the rank that failed first, before the others fail on its closed sockets.
    try:
        result = _run(cfg, backend, device, local_rank, attempt, store, resume, stop)
    except Exception as err:
        if lost_a_peer(err):
            # A peer that died surfaces here as a broken connection. The launcher
            # names one failed rank, the first whose exit it sees; on a loaded
            # machine this rank's exit could beat the dead peer's report (polled
            # every 0.1 s, through the fork server), so this rank waits its turn.
            time.sleep(PEER_LOST_GRACE_S)
        raise
    dist.destroy_process_group()
    if stop.signal is not None:
        # The agent that passed the signal on is shutting the job down: it joins its workers and
        # reads no result, while a worker that returns one waits for it to be read (for the
        # agent's whole 30 s shutdown timeout, then SIGKILL). Everything is on disk: exit now,
        # with the signal's code, so that an agent that got no signal itself sees the job end
        # (shoal.launch reads stopped.json and reports a stop, not a failure).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.exit_code)
    return result


PEER_LOST_GRACE_S = 2.0
_PEER_LOST = re.compile(r"gloo/transport/tcp|Connection (?:closed|reset) by peer|Broken pipe")


def lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank went away."""
    return bool(_PEER_LOST.search(str(err)))


def _run(cfg: RunConfig, backend: str, device: torch.device, local_rank: int, attempt: int, store: dist.Store,
         resume: bool, stop: GracefulStop) -> dict[str, Any] | None:
    """The worker's part of the job, once the process group is up."""
    from shoal.training.loop import run_training

    check_restart_budget(attempt, store.add(RESTARTS_KEY, 0))
    ctx = WorkerContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=backend,
    )
    beyond = [r for r in cfg.slowdown.factors if r >= ctx.world_size]
    if beyond:
        raise ValueError(f"slowdown.factors: rank {beyond[0]} does not exist in a job of {ctx.world_size} workers")
    ps_strategy = parameter_server_class(cfg.strategy)
    if ps_strategy is not None:  # a worker process that may die and rejoin, under this one
        result = supervise(cfg, ctx, ps_strategy, store=store, attempt=attempt, resume=resume, train=run_training,
                           stop=stop)
        dist.barrier()
        return result
    if cfg.fault.target == "server":
        raise ValueError(f"fault.target=server: strategy {cfg.strategy.name!r} has no parameter server")
    factor = cfg.slowdown.factors.get(ctx.rank, 1.0)
    with Slowdown(factor, threads=torch.get_num_threads(), method=cfg.slowdown.method,
                  label=f"rank {ctx.rank}") as slowdown:
        summary = run_training(cfg, ctx, resume=resume, slowdown=slowdown, attempt=attempt, stop=stop)
    # Without this barrier a rank can reach interpreter shutdown while a gloo
    # thread still frees the last all-reduce's tensors, and abort (SIGABRT):
    # seen in about 1 run in 8 on a loaded machine.
    dist.barrier()
    return summary.model_dump() if summary is not None else None


def main(argv: list[str] | None = None) -> int:
    """``python -m shoal.worker CONFIG [--set k=v ...] [--out DIR] [--resume]`` under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m shoal.worker", description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, out=args.out)
    except ConfigError as err:
        print(f"shoal: config error: {err}", file=sys.stderr)
        return 2
    worker_main(cfg.model_dump(mode="json"), args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
