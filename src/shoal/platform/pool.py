"""What one scheduling pass of the service sees of its node: the node as a placement unit, the running
jobs' view, and the users' quotas (:mod:`shoal.platform.agent` runs the pass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from shoal.platform.cluster import Cluster
from shoal.platform.node import Node
from shoal.platform.policies.base import Job, PendingQueue, Policy, Sorted
from shoal.platform.spec import JobSpec


class NodePool(Cluster):
    """The node as one placement unit of CPU slots, with memory and GPUs checked beside them."""

    def __init__(self, node: Node):
        super().__init__(node.slots, node.slots)
        self.memory_free, self.gpus_free = node.memory_mb, node.gpus
        self.needs: dict[int, tuple[int, int]] = {}  # job id -> (memory MiB, GPUs) at its size

    def allocate(self, job: int, gpus: int):  # type: ignore[override]
        memory, devices = self.needs[job]
        if memory > self.memory_free or devices > self.gpus_free:
            return None
        alloc = super().allocate(job, gpus)
        if alloc is not None:
            self.memory_free, self.gpus_free = self.memory_free - memory, self.gpus_free - devices
        return alloc

    def release(self, job: int):  # type: ignore[override]
        memory, devices = self.needs[job]
        self.memory_free, self.gpus_free = self.memory_free + memory, self.gpus_free + devices
        return super().release(job)

    def restore(self, job: int, alloc) -> None:  # type: ignore[override]
        memory, devices = self.needs[job]
        super().restore(job, alloc)
        self.memory_free, self.gpus_free = self.memory_free - memory, self.gpus_free - devices


class WithinQuota:
    """A policy whose pending order skips the jobs of users at their CPU quota (everything else is the
    policy's own). A job counts against its user's quota from the moment it is offered to the pass."""

    def __init__(self, policy: Policy, limits: dict[str, int | None], used: dict[str, int], users: dict[int, str]):
        self.policy, self.limits, self.used, self.users = policy, limits, dict(used), users
        self.held: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def pending_order(self, pending: PendingQueue, view: Any):  # type: ignore[no-untyped-def]
        for job in self.policy.pending_order(pending, view):
            user = self.users[job.id]
            limit, used = self.limits.get(user), self.used.get(user, 0)
            if limit is not None and used + job.gpus > limit:
                self.held[job.id] = f"quota: {user} holds {used} of {limit} CPUs and this job needs {job.gpus}"
                continue
            self.used[user] = used + job.gpus
            yield job


@dataclass
class View:
    """What a pass reads of the running jobs (:class:`~shoal.platform.policies.base.ClusterView`)."""

    cluster: NodePool
    running: dict[int, Job]
    ranked: Sorted
    exposed: Sorted
    used_by_queue: dict[str, int]
    victim_loss: Callable[[Job, float], float] | None = None


def needs(spec: JobSpec, workers: int) -> tuple[int, int]:
    return workers * spec.resources.memory_mb, workers * spec.resources.gpus


def held_cpus(row: dict[str, Any]) -> int:
    """How many CPUs a job's row says it holds now."""
    return len(row["cpus"].split(",")) if row["cpus"] else 0
