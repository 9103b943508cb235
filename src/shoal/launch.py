"""Start a job's workers through PyTorch's elastic launcher (the engine behind torchrun).

One node: ``launch(cfg)`` starts ``cfg.workers`` processes with a c10d
rendezvous on a free loopback port. Several nodes: each node calls it with
``nnodes``, the same ``rdzv_endpoint`` and ``run_id``, and ``is_host=True`` on
the node whose address the endpoint names (that node hosts the store).
"""

from __future__ import annotations

import logging
import signal as signal_module
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from shoal.config import RunConfig
from shoal.engine.stop import EXIT_CODES, STOPPED, read_stopped
from shoal.metrics.summary import Summary
from shoal.preload import START_METHOD, Inherited, start_worker_server, workers_skip_main
from shoal.worker import worker_main


@dataclass
class RankFailure:
    rank: int
    exitcode: int
    message: str
    traceback: str


class Stopped(Exception):
    """The job was stopped by SIGINT or SIGTERM. ``step``: the step its workers
    checkpointed after (None: stopped before training began, nothing to resume)."""

    def __init__(self, signal: str, step: int | None, out: str):
        self.signal, self.step, self.out = signal, step, out
        where = f"at step {step}" if step is not None else "before its first step"
        super().__init__(f"stopped by {signal} {where}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(getattr(signal_module.Signals, self.signal, None), 1)


class JobFailed(RuntimeError):
    """One or more workers failed; ``failures`` says which and why."""

    def __init__(self, failures: list[RankFailure]):
        self.failures = failures
        first = failures[0]
        super().__init__(f"rank {first.rank} failed (exit code {first.exitcode}): {first.message}")


def _entry(config: dict, resume: bool, inherited: None) -> dict | None:
    """The worker's entry point (``inherited`` was applied while it was unpickled)."""
    return worker_main(config, resume)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cfg: RunConfig,
    *,
    resume: bool = False,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    run_id: str | None = None,
    is_host: bool | None = None,
    local_addr: str | None = None,
    max_restarts: int = 0,
) -> Summary | None:
    """Run the job; returns the summary on the node that holds rank 0, else ``None``.

    Raises :class:`JobFailed` naming each failed rank and its error, and
    :class:`Stopped` when a SIGINT or SIGTERM stopped the job (its workers
    checkpointed at an agreed step first: ``resume=True`` continues there).
    """
    rdzv_configs: dict[str, object] = {"timeout": 300}
    if is_host is not None:
        rdzv_configs["is_host"] = is_host
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=cfg.workers,
        run_id=run_id or f"shoal-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or f"127.0.0.1:{free_port()}",
        rdzv_configs=rdzv_configs,
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method=START_METHOD,
        local_addr=local_addr or ("127.0.0.1" if nnodes == 1 else None),
    )
    # The agent logs every rendezvous step at INFO, and a stop's shutdown at WARNING;
    # a user wants the failures only.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)  # its own level
    # Worker failures are reported once, by rank, from the error files; not also as a log dump.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    start_worker_server()
    (Path(cfg.out) / STOPPED).unlink(missing_ok=True)  # only this launch's stop counts
    started = time.time()
    try:
        with workers_skip_main():
            results = elastic_launch(config, _entry)(cfg.model_dump(mode="json"), resume, Inherited())
    except ChildFailedError as err:
        failures, stopped = _failures(err), read_stopped(Path(cfg.out))
        if stopped is not None and all(f.exitcode in EXIT_CODES.values() for f in failures):
            raise Stopped(stopped["signal"], stopped["step"], cfg.out) from None  # the workers were signalled
        raise JobFailed(failures) from None
    except SignalException as err:  # the agent waited (up to 30 s) for the workers' stop first
        stopped = read_stopped(Path(cfg.out))
        finished = Path(cfg.out) / "summary.json"
        if stopped is None and finished.is_file() and finished.stat().st_mtime >= started:
            return Summary.model_validate_json(finished.read_text())  # the signal came after the last step
        raise Stopped(signal_module.Signals(err.sigval).name, stopped["step"] if stopped else None,
                      cfg.out) from None
    summary = results.get(0) if results else None
    return Summary.model_validate(summary) if summary else None


def _failures(err: ChildFailedError) -> list[RankFailure]:
    failures = []
    for rank, failure in sorted(err.failures.items()):
        data = failure.error_file_data or {}
        message = data.get("message", {}) if isinstance(data, dict) else {}
        recorded = isinstance(message, dict) and bool(message.get("message"))
        if isinstance(message, dict):
            text = message.get("message", failure.message)
            trace = message.get("extraInfo", {}).get("py_callstack", "")
        else:
            text, trace = str(message or failure.message), ""
        if failure.exitcode < 0 and not recorded:  # died by a signal before it could say why
            text = f"killed by signal {failure.signal_name()}"
        failures.append(RankFailure(rank, failure.exitcode, str(text).strip(), str(trace)))
    return failures
