"""The machine a service schedules: its CPUs, memory and GPUs, and a cgroup per job to hold each to its share.

Cgroups: v2 (one unified tree, ``/sys/fs/cgroup/cgroup.controllers`` present) on most current hosts,
v1 (one tree per controller, ``/sys/fs/cgroup/memory`` and ``/sys/fs/cgroup/cpuset``) on older
ones; :func:`detect_cgroups` says which. A job's cgroup gets its CPU set and its memory limit;
the job's first process moves itself in before it starts the command (:mod:`shoal.platform.shim`),
so every process the job starts is held from the beginning. Over its limit, the kernel's OOM
killer kills a process of the job, and the cgroup's ``oom_kill`` counter says so afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Node:
    cpus: tuple[int, ...]  # CPU ids jobs may use
    memory_mb: int
    gpus: int

    @property
    def slots(self) -> int:
        return len(self.cpus)


def discover(cpus: int | None = None, memory_mb: int | None = None, gpus: int | None = None) -> Node:
    """This machine: the CPUs this process may run on, its memory, CUDA's device count; any figure given
    replaces the discovered one (``cpus`` beyond the real cores share them: jobs' CPU sets wrap)."""
    real = sorted(os.sched_getaffinity(0))
    ids = tuple(real[i % len(real)] for i in range(cpus)) if cpus else tuple(real)
    if memory_mb is None:
        memory_mb = _meminfo_mb()
    if gpus is None:
        gpus = _cuda_devices()
    return Node(ids, memory_mb, gpus)


def _meminfo_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_cgroups(root: Path = ROOT) -> str | None:
    """'v2', 'v1', or None where neither is writable here (jobs then run without limits)."""
    if (root / "cgroup.controllers").is_file():
        return "v2" if os.access(root, os.W_OK) else None
    if (root / "memory").is_dir() and (root / "cpuset").is_dir():
        return "v1" if os.access(root / "memory", os.W_OK) and os.access(root / "cpuset", os.W_OK) else None
    return None


class Cgroups:
    """Cgroups for the jobs of one service, under ``shoal-NAME`` (``NAME``: the service's own)."""

    def __init__(self, name: str, mode: str | None = None, root: Path = ROOT):
        self.mode = detect_cgroups(root) if mode is None else None if mode == "off" else mode
        self.root, self.name = root, f"shoal-{name}"
        if self.mode == "v2":
            self._enable_v2()

    def _enable_v2(self) -> None:
        base = self.root / self.name
        base.mkdir(exist_ok=True)
        for parent in (self.root, base):  # children of base may then set cpuset and memory limits
            try:
                (parent / "cgroup.subtree_control").write_text("+cpuset +memory")
            except OSError:
                pass  # already on, or delegated by the host's manager

    def dirs(self, job: int) -> list[Path]:
        if self.mode == "v2":
            return [self.root / self.name / f"job-{job}"]
        if self.mode == "v1":
            return [self.root / c / self.name / f"job-{job}" for c in ("memory", "cpuset")]
        return []

    def create(self, job: int, cpus: tuple[int, ...], memory_mb: int) -> list[Path]:
        """The job's cgroup(s) with its CPU set and memory limit; the paths its first process joins."""
        cpu_list = ",".join(str(c) for c in sorted(set(cpus)))
        limit = str(memory_mb * 1024 * 1024)
        made = self.dirs(job)
        for path in made:
            path.mkdir(parents=True, exist_ok=True)
        if self.mode == "v2":
            (made[0] / "cpuset.cpus").write_text(cpu_list)
            (made[0] / "memory.max").write_text(limit)
            _try_write(made[0] / "memory.swap.max", "0")
        elif self.mode == "v1":
            memory, cpuset = made
            for level in (cpuset.parent, cpuset):  # v1 cpusets need cpus and mems set at every level
                if not (level / "cpuset.mems").read_text().strip():
                    (level / "cpuset.mems").write_text((self.root / "cpuset" / "cpuset.mems").read_text().strip())
                if level != cpuset and not (level / "cpuset.cpus").read_text().strip():
                    (level / "cpuset.cpus").write_text((self.root / "cpuset" / "cpuset.cpus").read_text().strip())
            (cpuset / "cpuset.cpus").write_text(cpu_list)
            (memory / "memory.limit_in_bytes").write_text(limit)
            _try_write(memory / "memory.memsw.limit_in_bytes", limit)  # no swapping past the limit either
        return made

    def oom_kills(self, job: int) -> int:
        """How many processes of the job the kernel's OOM killer has killed."""
        for path in self.dirs(job):
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = (path / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        return 0

    def remove(self, job: int) -> None:
        for path in self.dirs(job):
            try:
                path.rmdir()
            except OSError:
                pass  # a process is still inside (it is removed once the job is gone), or it never was made


def join(paths: list[str]) -> None:
    """Move this process into the cgroups ``paths`` (each a directory with ``cgroup.procs``)."""
    for path in paths:
        Path(path, "cgroup.procs").write_text(str(os.getpid()))


def _try_write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass  # the host runs without swap accounting
