"""Workers forked from a preloaded server process, not spawned afresh.

A spawned worker imports torch and shoal's worker (some 3 s of CPU on these
machines) before it can join its group. Instead the launcher's workers are
forked by multiprocessing's fork server, which imports them once: every job
that a process starts after its first (a test suite, a notebook, a benchmark)
starts its workers at once, and ``shoal train`` starts the server while it
imports the launcher, so the two imports overlap.

This module imports no torch: the command line calls it first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from multiprocessing import reduction, spawn
from typing import Any, Iterator

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What every worker imports before its first step: the training loop (with the plotting it
# finishes with) and torch._dynamo, which torch imports lazily on the first optimizer a process
# builds (some 2 s of CPU). Imported here once, not again in each worker of each job.
PRELOAD = ["shoal.launch", "shoal.worker", "shoal.training.loop", "torch._dynamo"]


def start_worker_server() -> None:
    """Start the fork server (if not yet running) with the worker's modules preloaded; returns at once."""
    if START_METHOD != "forkserver":
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


class Inherited:
    """What a worker should inherit from its launcher, carried through the fork server.

    A worker forked by the fork server would see the server's environment and
    standard streams as they were when the server started, not the launcher's
    now. Pickled into the worker's arguments, this carries the launcher's
    environment and duplicates of its stdout and stderr (multiprocessing passes
    them as file descriptors) and applies them in the worker as it is
    unpickled: before the launcher's per-worker variables (RANK, ...) are set
    on top. multiprocessing itself restores the working directory and sys.path.
    """

    def __init__(self) -> None:
        self.env = dict(os.environ)

    def __reduce__(self) -> tuple[Any, ...]:  # in the launcher, while multiprocessing starts the worker
        streams = []
        for fd in (1, 2) if START_METHOD == "forkserver" else ():
            try:
                os.fstat(fd)
            except OSError:
                continue  # closed in the launcher: the worker keeps the server's
            streams.append((fd, reduction.DupFd(fd)))
        return _apply, (self.env, streams)


def _apply(env: dict[str, str], streams: list[tuple[int, Any]]) -> None:
    os.environ.clear()
    os.environ.update(env)
    for target, dup in streams:
        fd = dup.detach()
        if fd != target:
            (sys.stdout if target == 1 else sys.stderr).flush()
            os.dup2(fd, target)
            os.close(fd)


@contextlib.contextmanager
def workers_skip_main() -> Iterator[None]:
    """Start workers that do not import the caller's ``__main__``.

    multiprocessing's spawn and fork-server workers re-import the parent's main
    script (or ``-m`` module) before they unpickle their target. A script that
    calls ``shoal.train`` without an ``if __name__ == "__main__":`` guard would
    then start the job again inside every worker, and from ``python -`` the
    worker fails on ``<stdin>``. A shoal worker's target lives in shoal's own
    modules and needs nothing of the main module, so the workers started inside
    this block are told to leave it alone (which is also why a config may not
    name ``__main__:...`` as an entry point: see ``shoal.registry``).
    """
    original = spawn.get_preparation_data

    def without_main(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = without_main
    try:
        yield
    finally:
        spawn.get_preparation_data = original
