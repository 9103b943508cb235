"""A simulated round's clients trained in this process or in parallel: ``shoal fl simulate --processes N``.

After pfl-research's simulator (Granqvist et al. 2024): one model per worker process, reloaded in
place for every client, and each round's clients dealt out longest first against stragglers.

1. Before the first round the parent forks N workers. Each inherits, copy-on-write, the local
   trainer and its model, the training set, the partitions (index arrays), and one float32 vector
   in shared memory that holds the round's global weights.
2. Each round the parent writes the global weights into that vector once and sends each free
   worker the next :class:`ClientTask` (client, local epochs, seed, the strategy's client config,
   the client's error-feedback memory), the longest first (samples x epochs).
3. A worker fetches its client's samples, runs :func:`train_client`, the same call the
   in-process path makes, and answers with a :class:`ClientOutcome`: the result and the updated
   memory, or the error the client raised.
4. :meth:`ClientPool.run` returns once every task is answered. The caller reads the outcomes in
   client order, so what is aggregated and recorded is the same whatever N is and whichever
   worker finished first.

A worker that dies stops the run with :class:`WorkerDied`, naming it, how it ended and its client.
Messages are pickled, over pipes between this process and its own children: nothing here reads
from the network.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from torch.utils.data import Dataset

from shoal.comm.codecs.base import build_codec
from shoal.comm.memory import ErrorFeedback
from shoal.data.shard import fetch
from shoal.fl.local import LocalResult, LocalTrainer
from shoal.registry import Component


class ClientFailed(RuntimeError):
    """A simulated client raised; the run stops with its error."""


class WorkerDied(ClientFailed):
    """A worker process ended while it trained a client (killed, out of memory)."""


class RemoteTraceback(Exception):
    """The traceback of an error raised in a worker, as text (the cause of its :class:`ClientFailed`)."""


@dataclass
class ClientTask:
    """What one client needs to train one round (the weights travel apart, once per round)."""

    client: int
    samples: int
    epochs: int
    seed: int
    config: dict[str, Any]
    memory: ErrorFeedback | None  # fl.codec memory=ef: the client's residual from its last round

    @property
    def cost(self) -> int:
        return self.samples * self.epochs


@dataclass
class ClientOutcome:
    client: int
    result: LocalResult | None = None
    memory: ErrorFeedback | None = None
    error: str | None = None  # "TypeName: message", as ClientFailed quotes it
    cause: BaseException | None = None  # the exception itself in this process, a RemoteTraceback from a worker


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def train_client(trainer: LocalTrainer, codec: Component, weights: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, task: ClientTask) -> LocalResult:
    """One client's local round. Its random numbers come from its seed alone, never from the clients
    trained before it in the same process, so any worker gives the same result: the uplink codec is
    built for this client and round (its stochastic rounding or sampling stream seeded by it), and
    whatever the model draws from torch's global generator (dropout) is seeded by it inside
    ``fork_rng``, which gives the caller's stream back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        # Codecs add the rank to their own seed times 1,000,003: 32 bits keep that within a seed's range.
        return trainer.fit(weights, x, y, epochs=task.epochs, config=task.config, seed=task.seed,
                           memory=task.memory, client=task.client, codec=build_codec(codec, rank=task.seed % 2**32))


def _work(trainer: LocalTrainer, codec: Component, train_set: Dataset, parts: list[Any], weights: torch.Tensor,
          task: ClientTask, *, remote: bool) -> ClientOutcome:
    try:
        x, y = fetch(train_set, parts[task.client].tolist())
        result = train_client(trainer, codec, weights, x, y, task)
    except Exception as err:
        cause = RemoteTraceback(traceback.format_exc()) if remote else err
        return ClientOutcome(task.client, error=f"{type(err).__name__}: {err}", cause=cause)
    return ClientOutcome(task.client, result, task.memory)


class InProcess:
    """Every client in this process, one after another on one model (``--processes 1``)."""

    processes = 1
    worker_peak_memory_bytes = None

    def __init__(self, trainer: LocalTrainer, codec: Component, train_set: Dataset, parts: list[Any]):
        self.trainer, self.codec, self.train_set, self.parts = trainer, codec, train_set, parts

    def run(self, rnd: int, weights: torch.Tensor, tasks: list[ClientTask]) -> dict[int, ClientOutcome]:
        outcomes = {}
        for task in tasks:
            outcomes[task.client] = _work(self.trainer, self.codec, self.train_set, self.parts, weights, task,
                                          remote=False)
            if outcomes[task.client].error is not None:
                break  # the run stops at this client, as a pool's caller stops at the first error in order
        return outcomes

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing's fork Process
    conn: Connection


class ClientPool:
    """``processes`` forked workers, each with a model and the data, shut down on exit and on Ctrl-C."""

    def __init__(self, processes: int, trainer: LocalTrainer, codec: Component, train_set: Dataset,
                 parts: list[Any], numel: int):
        if processes < 2:
            raise ValueError(f"processes: a pool needs at least 2, got {processes} (use InProcess)")
        context = multiprocessing.get_context("fork")
        self.weights = torch.zeros(numel).share_memory_()  # the round's global weights, read by every worker
        self.workers: list[_Worker] = []
        self.processes = processes
        # The largest worker's peak RSS, which counts the pages it still shares with this process.
        self.worker_peak_memory_bytes: int | None = None
        sys.stdout.flush()  # what is buffered now would otherwise be written again by every child
        sys.stderr.flush()
        try:
            for index in range(processes):
                mine, theirs = context.Pipe()
                parent_ends = [mine, *(w.conn for w in self.workers)]
                process = context.Process(target=_serve, name=f"shoal-fl-worker-{index}", daemon=True,
                                          args=(theirs, parent_ends, self.weights, trainer, codec, train_set, parts))
                process.start()
                theirs.close()
                self.workers.append(_Worker(index, process, mine))
        except BaseException:
            self.close(graceful=False)
            raise

    def run(self, rnd: int, weights: torch.Tensor, tasks: list[ClientTask]) -> dict[int, ClientOutcome]:
        """Every task's outcome, keyed by client; :class:`WorkerDied` if a worker ends under one."""
        self.weights.copy_(weights)
        queue = sorted(tasks, key=lambda t: (t.cost, -t.client))  # popped from the end: longest first
        idle = list(reversed(self.workers))
        busy: dict[Any, tuple[_Worker, ClientTask]] = {}  # a worker's connection and its process's sentinel
        outcomes: dict[int, ClientOutcome] = {}
        while queue or busy:
            while queue and idle:
                worker, task = idle.pop(), queue.pop()
                try:
                    worker.conn.send_bytes(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))
                except OSError:
                    raise self._died(worker, task, rnd) from None
                busy[worker.conn] = busy[worker.process.sentinel] = (worker, task)
            for ready in wait(list(busy)):
                if ready not in busy:
                    continue  # the other handle of a worker already dealt with in this pass
                worker, task = busy[ready]
                try:
                    outcome = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._died(worker, task, rnd) from None
                del busy[worker.conn], busy[worker.process.sentinel]
                outcomes[task.client] = outcome
                idle.append(worker)
        return outcomes

    def _died(self, worker: _Worker, task: ClientTask, rnd: int) -> WorkerDied:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        if code is None:
            how = "its pipe closed"
        elif code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        return WorkerDied(f"worker process {worker.index} (pid {worker.process.pid}) died ({how}) while training "
                          f"client {task.client} in round {rnd}; the run stops")

    def close(self, *, graceful: bool = True) -> None:
        """Stop every worker: asked to exit (answering with its peak RSS) when the run ended well,
        terminated otherwise."""
        peaks = []
        for worker in self.workers:
            if graceful and worker.process.is_alive():
                try:
                    worker.conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
        for worker in self.workers:
            try:
                if graceful and worker.conn.poll(5):
                    peaks.append(pickle.loads(worker.conn.recv_bytes()))
            except (EOFError, OSError):
                pass
            worker.process.join(timeout=5 if graceful else 0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers = []
        if peaks:
            self.worker_peak_memory_bytes = max(peaks)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(graceful=exc_type is None)


def _serve(conn: Connection, parent_ends: list[Connection], weights: torch.Tensor, trainer: LocalTrainer,
           codec: Component, train_set: Dataset, parts: list[Any]) -> None:
    """A worker's loop: train each task it is sent, until told to stop or its parent is gone."""
    # The terminal's Ctrl-C reaches the whole process group; the parent shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for end in parent_ends:  # held here, they would keep this pipe open after the parent died
        end.close()
    torch.set_num_threads(1)  # as the parent: a fork must not use the intra-op thread pool it copied
    while True:
        try:
            task = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if task is None:  # stop, and say how much memory this worker took at most
            conn.send_bytes(pickle.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
            return
        outcome = _work(trainer, codec, train_set, parts, weights, task, remote=True)
        try:
            message = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # a result that cannot travel is the client's failure too
            message = pickle.dumps(ClientOutcome(task.client, error=f"{type(err).__name__}: {err}",
                                                 cause=RemoteTraceback(traceback.format_exc())))
        conn.send_bytes(message)
