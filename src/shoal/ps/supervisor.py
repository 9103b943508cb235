"""A rank whose training process may die without taking the job down.

Under the parameter-server strategies a rank is two processes. The one the
elastic launcher starts (the *supervisor*) holds what must outlive a crash:
the process group, the RPC membership and the rank's parameter shard
(:class:`~shoal.ps.host.PsHost`). It starts the *worker*, a child that runs
the ordinary training loop and reaches everything outside itself through one
pipe to its supervisor (:class:`~shoal.ps.proxy.SupervisorProxy`): pushes and
pulls, the loop's few collectives, its counters after every step.

When the worker dies (a crash, SIGKILL, the OOM killer) the other ranks train
on; the supervisor starts a new worker, which rejoins at the dead one's last
published step count, with its learning-rate schedule there, and the servers'
current parameters (the step in flight is done again; the error-feedback
residual is lost). Restarts are counted job-wide against the launcher's
``--max-restarts``, together with group restarts. A worker that *raises* is
not restarted alone: an error is a bug or a bad input, not a crash; its rank
fails, as any failing rank does. When a supervisor dies, its shard goes with
it: the launcher restarts the group, every shard reloads its last shard
checkpoint and every worker resumes at the step count its supervisor last
published in the job's store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from shoal.config import RunConfig, validate_config
from shoal.ps.host import PsHost
from shoal.ps.proxy import Call, LinkClosed, Note, SupervisorProxy, answers
from shoal.ps.strategy import PsStrategy
from shoal.strategies.base import WorkerContext
from shoal.engine.group import TorchGroup
from shoal.engine.stop import GracefulStop

RESTARTS_KEY = "shoal/worker_restarts"  # job-wide count of worker (not group) restarts


def supervise(cfg: RunConfig, ctx: WorkerContext, strategy: type[PsStrategy], *, store: dist.Store, attempt: int,
              resume: bool, train: Callable[..., Any], stop: GracefulStop | None = None) -> dict[str, Any] | None:
    """Host this rank's shard, run its worker to the end (restarting it when it
    dies, while the budget lasts); rank 0 returns the run's summary.

    ``train`` is the loop the worker process runs (``shoal.training.loop.run_training``,
    handed down by the caller so that this package never imports the layer above it);
    it must be a module-level function, since it travels to the spawned worker by name.
    ``stop``: this process's SIGINT/SIGTERM record; a signal is passed on to the worker
    process, which stops the job as at a target (the terminal's Ctrl-C reaches it anyway)."""
    from shoal.data import build_dataset
    from shoal.models import build_model
    from shoal.engine.checkpoint import load_weights

    if cfg.fault.target == "server" and cfg.fault.kill_rank is not None:
        servers = strategy.server_count(cfg.strategy.options)
        if cfg.fault.kill_rank >= servers:
            raise ValueError(f"fault.kill_rank={cfg.fault.kill_rank} with fault.target=server: "
                             f"only ranks 0..{servers - 1} serve a shard")
    progress_key = f"shoal/progress/rank{ctx.rank}"
    rejoin: dict[str, Any] | None = None
    if attempt > 0 and store.check([progress_key]):  # the group was restarted: go on from the published counters
        rejoin, resume = json.loads(store.get(progress_key)), False
    if attempt == 0 and cfg.train.checkpoint_every == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        print(f"rank {ctx.rank}: train.checkpoint_every is 0: no shard checkpoints, so a server that dies "
              "comes back with the initial weights", file=sys.stderr, flush=True)
    budget = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    spawn = mp.get_context("spawn")
    config = cfg.model_dump(mode="json")
    threads = torch.get_num_threads()

    def start(rejoin: dict[str, Any] | None, resume: bool) -> tuple[Any, Any]:
        parent, child = spawn.Pipe()
        worker = spawn.Process(target=_worker_main,
                               args=(child, train, config, ctx, strategy, resume, attempt, rejoin, threads),
                               name=f"shoal-worker-{ctx.rank}", daemon=True)
        worker.start()
        child.close()
        return parent, worker

    parent, worker = start(rejoin, resume)  # it imports and builds while the shard is set up here
    if stop is not None:
        stop.relay_to(lambda sig: _signal(worker, sig))  # a signal during start-up is passed on now
    torch.manual_seed(cfg.seed)  # the workers' initial weights: the shards start from them
    model = build_model(cfg.model, build_dataset(cfg.data.dataset))
    if cfg.train.init_from:  # fine-tuning: the shards start from the checkpoint, as the workers' replicas do
        load_weights(model, cfg.train.init_from, torch.device("cpu"))
    host = PsHost(strategy, cfg, ctx, model, restore_shard=attempt > 0, fresh=attempt == 0 and not resume,
                  worker_restarts=lambda: store.add(RESTARTS_KEY, 0))
    if host.restored_version is not None:
        print(f"rank {ctx.rank}: shard {ctx.rank} restored from its checkpoint at version {host.restored_version}",
              file=sys.stderr, flush=True)
    table = answers(host, TorchGroup(ctx.world_size, ctx.device))
    while True:
        outcome, value = _serve(parent, worker, table, store, progress_key)
        parent.close()
        worker.join()
        if outcome == "result":
            return value
        if outcome == "error":
            message, trace = value
            print(f"rank {ctx.rank}: worker process failed:\n{trace}", file=sys.stderr, flush=True)
            raise RuntimeError(message)
        if stop is not None and stop.requested:  # ended by the signal (e.g. before it set its handlers)
            raise RuntimeError(f"rank {ctx.rank}'s worker process {_exit_reason(worker.exitcode)} on "
                               f"{stop.signal.name}; no restart while the job stops")
        # Died without a word: a crash. Start another while the job's budget lasts.
        restarts = store.add(RESTARTS_KEY, 1)
        how = _exit_reason(worker.exitcode)
        step = int(value.get("step", 0)) if value else 0
        if attempt + restarts > budget:
            message = (f"rank {ctx.rank}'s worker process {how} after step {step}; restart budget spent "
                       f"(--max-restarts {budget}, job-wide: {attempt} group and {restarts} worker restarts)")
            print(message, file=sys.stderr, flush=True)  # the other ranks may fail first, on its absence
            raise RuntimeError(message)
        print(f"rank {ctx.rank}: worker process {how} after step {step}; starting it again "
              f"(restart {attempt + restarts} of {budget}), the others train on", file=sys.stderr, flush=True)
        # Died before it passed the start-up collectives (no counters yet): start it as the first one was.
        parent, worker = start(value, False) if value is not None else start(rejoin, resume)


def _serve(conn: Any, worker: Any, table: dict[Call, Callable[..., Any]], store: dist.Store,
           progress_key: str) -> tuple[str, Any]:
    """Answer the worker until it finishes, fails or dies. Returns ``("result",
    summary)``, ``("error", (message, traceback))`` or ``("died", last counters)``."""
    last: dict[str, Any] | None = None
    while True:
        try:
            kind, args = pickle.loads(conn.recv_bytes())
        except (OSError, EOFError):
            return "died", last
        if kind is Note.PROGRESS:
            last = args[0]
            store.set(progress_key, json.dumps(_jsonable(last)))
            continue
        if kind is Note.RESULT:
            return "result", args[0]
        if kind is Note.ERROR:
            return "error", args[0]
        if kind is Note.DIE:  # fault.target=server: this process, with its shard
            worker.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        answer = table.get(kind)
        if answer is None:
            reply: tuple[str, Any] = ("error", f"unknown call {kind!r}")
        else:
            try:
                reply = ("ok", answer(*args))
            except Exception as err:  # the worker raises it; the job fails with its message
                reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError):
            return "died", last


def _worker_main(conn: Any, train: Callable[..., Any], config: dict[str, Any], ctx: WorkerContext,
                 strategy: type[PsStrategy], resume: bool, attempt: int, rejoin: dict[str, Any] | None,
                 threads: int) -> None:
    """The worker process: the ordinary training loop, linked to its supervisor."""
    from shoal.netem.slowdown import Slowdown

    _die_with_parent()
    supervisor = SupervisorProxy(conn)
    try:
        torch.set_num_threads(threads)
        cfg = validate_config(config)
        # The loop builds its strategy from cfg.strategy.target: here, the class
        # this rank's host serves (sync:backup=b's too), handed the proxy.
        bound = functools.partial(strategy, supervisor=supervisor)
        cfg = cfg.model_copy(update={"strategy": dataclasses.replace(cfg.strategy, target=bound)})
        factor = cfg.slowdown.factors.get(ctx.rank, 1.0)
        with GracefulStop() as stop, Slowdown(factor, threads=threads, method=cfg.slowdown.method,
                                              label=f"rank {ctx.rank}") as slowdown:
            summary = train(cfg, ctx, resume=resume, slowdown=slowdown, attempt=attempt,
                            group=supervisor, rejoin=rejoin, stop=stop)
        supervisor.result(summary.model_dump() if summary is not None else None)
    except LinkClosed:
        os._exit(1)  # the supervisor died: nothing to report to
    except BaseException as err:  # noqa: BLE001 - reported to the supervisor, which fails the job
        try:
            supervisor.error(f"{type(err).__name__}: {err}", traceback.format_exc())
        except LinkClosed:
            pass
        os._exit(1)
    conn.close()


def _signal(worker: Any, sig: int) -> None:
    try:
        os.kill(worker.pid, sig)
    except (ProcessLookupError, TypeError):  # gone, or not started yet
        pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its supervisor dies, so no orphan trains on
    beside the worker a restarted group starts (elsewhere: it exits at its next call)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the supervisor was already gone
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code} without a result"


def _jsonable(counters: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in counters.items()}
