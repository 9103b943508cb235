"""How the service starts, reads and explains a job's processes: the command line of a run (a resumed
``shoal train`` keeps its global batch), the reason a job failed, and the files its shim leaves."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from shoal.platform.pool import needs
from shoal.platform.shim import write_atomic
from shoal.platform.spec import JobSpec


def job_argv(spec: JobSpec, workers: int, jd: Path) -> list[str]:
    """What a job runs: its command, or ``shoal train`` on its config (``--resume`` once it has a checkpoint),
    at ``workers`` with the per-worker batch that keeps its global batch."""
    if spec.kind == "command":
        return list(spec.command or ())
    run = jd / "run"
    config = jd / "config.yaml"
    if not config.exists():
        tmp = config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(spec.config))
        os.replace(tmp, config)
    batch = global_batch(spec, jd)
    overrides = [*spec.set, f"data.batch_size={max(1, round(batch / workers))}"] if batch else list(spec.set)
    sets = [a for o in overrides for a in ("--set", o)]
    train = [sys.executable, "-m", "shoal.cli", "train"]
    if (run / "checkpoint.pt").is_file():
        return [*train, "--resume", str(run), "--workers", str(workers), *sets]
    return [*train, str(config), "--out", str(run), "--workers", str(workers), *sets]


def global_batch(spec: JobSpec, jd: Path) -> int | None:
    """A train job's global batch, fixed at its first start (per-worker batch x workers then), so that a
    resized job keeps it: per-worker batch = global / workers, rounded."""
    path = jd / "global_batch.json"
    known = read_json(path)
    if known is not None:
        return known["global_batch"]
    from shoal.config import load_config

    cfg = load_config(spec.config, list(spec.set), workers=spec.most)  # type: ignore[arg-type]
    batch = cfg.data.batch_size * spec.most
    write_atomic(path, {"global_batch": batch})
    return batch


def why_failed(code: int | None, oom: int, spec: JobSpec, workers: int | None) -> str:
    if oom:
        return f"killed by the kernel: over its memory limit of {needs(spec, workers or 1)[0]} MiB"
    if code is None:
        return "its process ended without an exit status (killed from outside)"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"


def is_shim(pid: int) -> bool:
    try:
        return b"shoal.platform.shim" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
