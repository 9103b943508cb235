"""Emulated unequal hardware: make one worker's compute FACTOR times slower.

Two ways, chosen by ``method``:

- ``cgroup``: the worker process moves into its own CPU cgroup whose quota is
  its fair share of the machine divided by FACTOR (cgroup v2 ``cpu.max``, or
  v1 ``cpu.cfs_quota_us``). The kernel throttles it like a slower CPU: the
  worker cannot tell, and its idle waits (network, barriers) cost nothing.
  Needs root and a writable cgroup hierarchy.
- ``busy``: at the start of each training forward pass the worker spins for
  ``(FACTOR - 1)`` times the last step's own compute time, holding the CPU as
  a slow core would. The wait falls inside the step, before any gradient is
  sent, so timing, DDP and the strategies see it as compute.

``auto`` takes the cgroup where it can be made, else busy-waiting. The
worker's fair share is its intra-op threads, capped by the machine's cores
divided by the workers sharing them (``SHOAL_MACHINE_WORKERS`` when several
emulated hosts share one machine, else the launcher's ``LOCAL_WORLD_SIZE``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
# CFS enforces the quota per period: with the default 100 ms a worker runs at
# full speed for its quota, then freezes for the rest, and the freeze lands in
# whatever the step was doing (often a collective, where it reads as waiting).
# A 10 ms period spreads the slowdown evenly over a step's compute.
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel's floor


def fair_share(threads: int) -> float:
    """Cores this worker would get with every worker on the machine busy."""
    workers = int(os.environ.get("SHOAL_MACHINE_WORKERS") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return min(float(threads), (os.cpu_count() or 1) / max(workers, 1))


def _cpu_hierarchy() -> tuple[Path, str] | None:
    """(directory new cgroups go under, 'v2' or 'v1') if this process may make one."""
    v2 = CGROUP_ROOT / "cgroup.controllers"
    if v2.is_file() and "cpu" in v2.read_text().split() and os.access(CGROUP_ROOT, os.W_OK):
        return CGROUP_ROOT, "v2"
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").is_file() and os.access(v1, os.W_OK):
        return v1, "v1"
    return None


def remove_stale_cgroups() -> None:
    """Remove ``shoal-slow-PID`` cgroups whose worker is gone (killed before it could)."""
    found = _cpu_hierarchy()
    if found is None:
        return
    for group in found[0].glob("shoal-slow-*"):
        pid = group.name.removeprefix("shoal-slow-")
        if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue  # a live worker's, perhaps just made and not yet joined
        try:
            group.rmdir()
        except OSError:
            pass


def _current_cgroup(parent: Path, version: str) -> Path:
    """The cgroup this process is in now, in the hierarchy at ``parent``."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (version == "v2" and controllers == "") or (version == "v1" and "cpu" in controllers.split(",")):
                return parent / path.lstrip("/")
    except OSError:
        pass
    return parent


class Slowdown:
    """``with Slowdown(3.0, threads=1) as s: s.attach(model); ...; s.after_step(compute_s)``."""

    def __init__(self, factor: float, *, threads: int, method: str = "auto"):
        if factor < 1:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        if method not in ("auto", "cgroup", "busy"):
            raise ValueError(f"slowdown method {method!r}: allowed auto, cgroup, busy")
        self.factor = factor
        self.threads = threads
        self.requested = method
        self.method = "none" if factor == 1 else method
        self.cgroup: Path | None = None
        self._parent: Path | None = None
        self._base_s = 0.0  # the last step's compute without the added wait
        self._spun_s = 0.0

    def __enter__(self) -> "Slowdown":
        if self.method in ("auto", "cgroup"):
            reason = self._enter_cgroup()
            if reason and self.method == "cgroup":
                raise RuntimeError(f"slowdown by cgroup: {reason}")
            self.method = "busy" if reason else "cgroup"
        return self

    def _enter_cgroup(self) -> str | None:
        found = _cpu_hierarchy()
        if found is None:
            return "no writable cgroup cpu controller (needs root and cgroup v1 or v2 with cpu)"
        parent, version = found
        remove_stale_cgroups()
        self._parent = _current_cgroup(parent, version)  # where to go back to
        share = fair_share(self.threads) / self.factor  # cores
        period_us = max(PERIOD_US, int(MIN_QUOTA_US / share) + 1)
        quota_us = int(period_us * share)
        group = parent / f"shoal-slow-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
            if version == "v2":
                (group / "cpu.max").write_text(f"{quota_us} {period_us}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(period_us))
                (group / "cpu.cfs_quota_us").write_text(str(quota_us))
            # All of this process's threads move with it; threads started later inherit.
            (group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as err:
            try:
                group.rmdir()
            except OSError:
                pass
            return str(err)
        self.cgroup = group
        self.quota_cores = quota_us / period_us
        return None

    def attach(self, module: Any) -> None:
        """Busy-waiting: spin at the start of each training forward of ``module``."""
        if self.method == "busy":
            module.register_forward_pre_hook(self._spin)

    def _spin(self, module: Any, args: Any) -> None:
        if not module.training:
            return  # evaluation is not what the slowdown emulates
        wait = (self.factor - 1) * self._base_s
        until = time.perf_counter() + wait
        while time.perf_counter() < until:
            pass
        self._spun_s += wait

    def after_step(self, compute_s: float) -> None:
        """The step's measured compute, for the next step's wait."""
        self._base_s = max(compute_s - self._spun_s, 0.0)
        self._spun_s = 0.0

    def __exit__(self, *exc: object) -> None:
        if self.cgroup is None or self._parent is None:
            return
        try:
            (self._parent / "cgroup.procs").write_text(str(os.getpid()))
            self.cgroup.rmdir()
        except OSError:
            pass  # a later worker's remove_stale_cgroups() takes it
        self.cgroup = None

    def describe(self) -> str:
        if self.method == "cgroup":
            return f"{self.factor:g}x slower by a CPU quota of {self.quota_cores:.3f} cores ({self.cgroup})"
        if self.method == "busy":
            return f"{self.factor:g}x slower by busy-waiting in each step"
        return "full speed"
