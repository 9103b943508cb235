"""Fault injection (config ``fault:``): which step kills this worker, the kill
itself, and how long the restarted group took to come back."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from shoal.config import FaultConfig
from shoal.metrics.summary import write_json_atomic
from shoal.strategies.base import Strategy

FAULT = "fault.json"  # written by a worker killed by config fault.kill_rank


def kill_step(fault: FaultConfig, rank: int, *, first_start: bool) -> int | None:
    """The step after which config ``fault`` kills this worker: on its first start
    only (not after a restart, nor when it rejoins), or never (None)."""
    return fault.kill_step if first_start and fault.kill_rank == rank else None


def die(out: Path, rank: int, strategy: Strategy, target: str) -> None:
    """The injected fault: note when, then SIGKILL this worker (no cleanup, as a
    crash); ``target="server"``: the process serving its parameter shard instead."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / FAULT, {"rank": rank, "target": target, "time": time.time()})
    if target == "server":
        strategy.kill_server()  # does not return
    os.kill(os.getpid(), signal.SIGKILL)


def restart_time(out: Path) -> float | None:
    """Seconds from an injected kill to this attempt's first step (same machine only)."""
    try:
        return time.time() - json.loads((out / FAULT).read_text())["time"]
    except (OSError, ValueError, KeyError):
        return None
