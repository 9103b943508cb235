"""Emulated unequal hardware: make one worker's compute FACTOR times slower.

Two ways, chosen by ``method``:

- ``cgroup``: the worker process moves into its own CPU cgroup whose quota is
  its fair share of the machine divided by FACTOR (cgroup v2 ``cpu.max``, or
  v1 ``cpu.cfs_quota_us``). The kernel throttles it like a slower CPU: the
  worker cannot tell, and its idle waits (network, barriers) cost nothing.
  Needs root and a writable cgroup hierarchy.
- ``busy``: at the start of each training step's first forward pass the
  worker spins for ``(FACTOR - 1)`` times its own compute per step (the
  median of the last few steps, without their waits), holding the CPU as a
  slow core would. The wait falls inside the step, before any gradient is
  sent, so timing, DDP and the strategies see it as compute.

``auto`` takes the cgroup where it can be made, else busy-waiting. The
worker's fair share is its intra-op threads, capped by the machine's cores
divided by the workers sharing them (``SHOAL_MACHINE_WORKERS`` when several
emulated hosts share one machine, else the launcher's ``LOCAL_WORLD_SIZE``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import deque
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


class BusyWaitSchedule:
    """How long busy-waiting spins at each step: pure arithmetic, no clock.

    1. After each step, its own compute is the measured compute less the time
       actually spun in it (not the time asked for: a spin descheduled at its
       end overshoots, and that overshoot is not the worker's own work).
    2. A step's target wait is ``(factor - 1)`` times the median own compute of
       the last ``window`` steps, so one step stretched by the scheduler does
       not make the next wait jump, and no wait ever feeds on an earlier one.
    3. No wait before the first step has been measured.

    A spin that the scheduler stretches is not shortened at the next step: a
    slower core on a loaded machine would be descheduled in its extra work too.

    Waiting on the last step's compute less the wait *asked for* counted every
    scheduling delay inside a spin as the worker's own compute, (factor - 1)
    times over in the next wait, and made each wait follow one step's noise: a
    3x slowdown measured 2.4x to 5.4x on a loaded 2-core machine, 9x once
    (benchmarks/slowdown_fidelity.py, BENCHMARKS.md).
    """

    def __init__(self, factor: float, window: int = 5):
        self.factor = factor
        self._own: deque[float] = deque(maxlen=window)

    def next_wait(self) -> float:
        return (self.factor - 1) * statistics.median(self._own) if self._own else 0.0

    def record(self, compute_s: float, spun_s: float) -> float:
        """Note one step's measured compute and the time spun in it; returns its own compute."""
        own = max(compute_s - spun_s, 0.0)
        self._own.append(own)
        return own


class Slowdown:
    """``with Slowdown(3.0, threads=1) as s: s.attach(model); ...; s.after_step(compute_s)``.

    A slowed worker says on stderr, under ``label``, how it is slowed and, for
    a quota, how often the kernel throttled it."""

    def __init__(self, factor: float, *, threads: int, method: str = "auto", label: str = "this worker"):
        if factor < 1:
            raise ValueError(f"slowdown factor must be >= 1, got {factor}")
        if method not in ("auto", "cgroup", "busy"):
            raise ValueError(f"slowdown method {method!r}: allowed auto, cgroup, busy")
        self.factor = factor
        self.threads = threads
        self.label = label
        self.requested = method
        self.method = "none" if factor == 1 else method
        self.cgroup: Path | None = None
        self._parent: Path | None = None
        self.schedule = BusyWaitSchedule(factor)
        self._spun_s = 0.0  # spun in the current step
        self._due = True  # one wait per step, at its first training forward
        self.throttled: tuple[int, int] | None = None  # cgroup: (throttled periods, periods) at exit

    def __enter__(self) -> "Slowdown":
        if self.method in ("auto", "cgroup"):
            reason = self._enter_cgroup()
            if reason and self.method == "cgroup":
                raise RuntimeError(f"slowdown by cgroup: {reason}")
            self.method = "busy" if reason else "cgroup"
        if self.method != "none":
            print(f"{self.label}: {self.describe()}", file=sys.stderr, flush=True)
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
        if not module.training or not self._due:
            return  # evaluation is not what the slowdown emulates; later forwards of a step are not either
        self._due = False
        started = time.perf_counter()
        until = started + self.schedule.next_wait()
        while time.perf_counter() < until:
            pass
        self._spun_s += time.perf_counter() - started

    def after_step(self, compute_s: float) -> float:
        """The step's measured compute, for the next steps' waits; returns the seconds spun in the step."""
        spun, self._spun_s, self._due = self._spun_s, 0.0, True
        if self.method == "busy":
            self.schedule.record(compute_s, spun)
        return spun

    def __exit__(self, *exc: object) -> None:
        if self.cgroup is None or self._parent is None:
            return
        self.throttled = _throttled(self.cgroup)
        if self.throttled is not None:
            print(f"{self.label}: {self.report()}", file=sys.stderr, flush=True)
        try:
            (self._parent / "cgroup.procs").write_text(str(os.getpid()))
            self.cgroup.rmdir()
        except OSError:
            pass  # a later worker's remove_stale_cgroups() takes it
        self.cgroup = None

    def report(self) -> str | None:
        """What the kernel says the quota did (cgroup only, after exit): a line for the worker's log."""
        if self.throttled is None:
            return None
        throttled, periods = self.throttled
        return f"throttled in {throttled} of {periods} CPU periods"

    def describe(self) -> str:
        if self.method == "cgroup":
            return f"{self.factor:g}x slower by a CPU quota of {self.quota_cores:.3f} cores ({self.cgroup})"
        if self.method == "busy":
            return f"{self.factor:g}x slower by busy-waiting in each step"
        return "full speed"


def _throttled(group: Path) -> tuple[int, int] | None:
    """(throttled periods, periods) from the cgroup's ``cpu.stat`` (v1 and v2 name them alike)."""
    try:
        fields = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines() if line.strip())
        return int(fields["nr_throttled"]), int(fields["nr_periods"])
    except (OSError, KeyError, ValueError):
        return None
