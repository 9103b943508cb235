"""What a scheduling policy sees and decides; the scheduling pass every policy shares.

A policy is pure: it orders jobs and says which may preempt which, from what the job has done
so far (its arrival, GPUs, queue, priority, attained service, preemptions), never from its
duration, which neither a service nor a fair simulator knows. ``shoal sched simulate`` runs
these objects; a service is meant to run the same ones (it is not built yet).

A policy's ``key(job, now)`` (lower runs first), and whether a running job is ``preemptable``,
may change only at the times its ``next_change(job, now)`` names, so a job is re-ranked only
then; between those times the pending jobs stay sorted (:class:`PendingQueue`) and a pass walks
them best first, stopping early (see :func:`schedule`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from pydantic import BaseModel, ConfigDict, Field

from shoal.platform.cluster import Allocation, Cluster


@dataclass(eq=False)
class Job:
    """A gang job as a policy sees it; ``work_left`` (seconds of running still needed) is the
    simulator's, never read by a policy."""

    id: int
    submit: float
    gpus: int
    queue: str  # the user, queue or virtual cluster whose share it counts in
    priority: int = 0
    work_left: float = 0.0
    attained: float = 0.0  # GPU-seconds run so far, up to ``run_start``
    run_start: float | None = None  # when its current run began; None while pending
    first_start: float | None = None
    pending_since: float = 0.0
    preemptions: int = 0
    finished: float | None = None
    key: tuple[Any, ...] = ()
    token: int = 0  # bumped on every change of state, so stale events are ignored
    alloc: Allocation = field(default=())

    def attained_at(self, now: float) -> float:
        return self.attained + (self.gpus * (now - self.run_start) if self.run_start is not None else 0.0)


class PolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backfill: bool = Field(False, description="let a later job start when an earlier one does not fit "
                           "(false: strict order, the first job that does not fit blocks the rest)")


class Policy:
    """Order jobs; say whether one may preempt another. Subclasses set ``preemptive`` and ``key``."""

    preemptive = False

    def __init__(self, options: PolicyOptions | None = None):
        self.options = options or PolicyOptions()

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        raise NotImplementedError

    def next_change(self, job: Job, now: float) -> float | None:
        """When this job's key next changes without any event (None: only at events)."""
        return None

    def preemptable(self, job: Job, now: float) -> bool:
        """Whether a running job may be preempted at all now; it may change only at ``next_change``."""
        return self.preemptive

    def may_preempt(self, job: Job, victim: Job, now: float) -> bool:
        """Whether ``job`` may preempt ``victim`` (a preemptable job ranked below it)."""
        return self.preemptive and job.key < victim.key

    def preempt_class(self, job: Job) -> Any:
        """A value such that jobs sharing it may preempt the same victims (a pass then looks them up
        once); None: no such grouping."""
        return None

    def pending_order(self, pending: "PendingQueue", view: "ClusterView") -> Iterator[Job]:
        """The pending jobs, best first; a policy whose order depends on who runs (DRF) overrides it."""
        return iter(list(pending.jobs))


class ClusterView(Protocol):
    """What a pass may read of the running jobs: by id, ranked by key, the ones the policy would let be
    preempted now (``exposed``), GPUs per queue; and, where victims differ in what a preemption would
    cost them, ``victim_loss(job, now)``: the GPU-seconds of work it would lose (None where every victim
    loses the same, as in the simulator: then the lowest ranked go first)."""

    running: dict[int, Job]
    ranked: Sorted
    exposed: Sorted
    used_by_queue: dict[str, int]
    cluster: Cluster
    victim_loss: Callable[[Job, float], float] | None


class Sorted:
    """Jobs sorted by (key, id), best first; insertion and removal are C-level memmoves at these sizes."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.keys: list[tuple[Any, ...]] = []
        self.ids: set[int] = set()

    def __contains__(self, job: Job) -> bool:
        return job.id in self.ids

    def add(self, job: Job) -> None:
        full = (*job.key, job.id)
        at = bisect.bisect(self.keys, full)
        self.keys.insert(at, full)
        self.jobs.insert(at, job)
        self.ids.add(job.id)

    def remove(self, job: Job) -> None:
        at = bisect.bisect_left(self.keys, (*job.key, job.id))
        if at >= len(self.jobs) or self.jobs[at] is not job:
            raise KeyError(f"job {job.id} is not in this set")
        del self.keys[at], self.jobs[at]
        self.ids.discard(job.id)

    def discard(self, job: Job) -> None:
        if job in self:
            self.remove(job)


class PendingQueue:
    """The pending jobs sorted by key, all together and per queue."""

    def __init__(self) -> None:
        self.all = Sorted()
        self.by_queue: dict[str, Sorted] = {}

    @property
    def jobs(self) -> list[Job]:
        return self.all.jobs

    def __len__(self) -> int:
        return len(self.all.jobs)

    def add(self, job: Job) -> None:
        self.all.add(job)
        queue = self.by_queue.get(job.queue)
        if queue is None:
            queue = self.by_queue[job.queue] = Sorted()
        queue.add(job)

    def remove(self, job: Job) -> None:
        self.all.remove(job)
        self.by_queue[job.queue].remove(job)


@dataclass
class Decision:
    start: list[Job] = field(default_factory=list)
    preempt: list[Job] = field(default_factory=list)


def schedule(policy: Policy, pending: PendingQueue, view: ClusterView, now: float, *,
             max_blocked: int = 64) -> Decision:
    """One scheduling pass: start jobs best first, preempting where the policy allows.

    1. Take the pending jobs in the policy's order.
    2. A job that fits now is started (its GPUs allocated, gang: all or none).
    3. One that does not may preempt exposed running jobs the policy ranks below it: lowest ranked
       first, or, where the view says what each would lose (``victim_loss``), those that lose least
       first. The victims are released only if the job then fits, and any victim it turns out not
       to need is given its GPUs back.
    4. Without backfill the first job that cannot start stops the pass; with it, the pass goes on to
       later, smaller jobs (a later job as large as a blocked one is skipped: it ranks no higher, so it
       can neither fit nor preempt more), until ``max_blocked`` have been passed over.
    """
    decision = Decision()
    cluster = view.cluster
    victims: list[Job] | None = None
    room: dict[Any, dict[int, int]] = {}  # preempt class -> the GPUs its victims hold, per node
    smallest_blocked = cluster.gpus + 1
    for job in policy.pending_order(pending, view):
        if job.gpus >= smallest_blocked:
            continue  # a smaller job, ranked no lower, could neither fit nor preempt: neither can this one
        if cluster.allocate(job.id, job.gpus) is not None:
            decision.start.append(job)
            occupy(view, job)
            continue
        if policy.preemptive:
            if victims is None:  # lowest ranked first (none this pass started: they are not exposed yet)
                victims = view.exposed.jobs[::-1]
                if view.victim_loss is not None:  # the least work lost first; rank breaks ties
                    victims.sort(key=lambda v: view.victim_loss(v, now))
            freed = _preempt_for(policy, job, victims, view, now, room)
            if freed is not None:
                decision.preempt.extend(freed)
                decision.start.append(job)
                occupy(view, job)
                victims = [v for v in victims if v not in freed]
                room.clear()
                continue
        if not policy.options.backfill:
            break
        smallest_blocked = job.gpus
        max_blocked -= 1
        if max_blocked <= 0 or smallest_blocked == 1:
            break
    return decision


def expose(view: ClusterView, policy: Policy, job: Job, now: float) -> None:
    """Keep ``view.exposed`` true for a running job: call at its start and whenever its key may change."""
    if policy.preemptable(job, now):
        if job not in view.exposed:
            view.exposed.add(job)
    else:
        view.exposed.discard(job)


def occupy(view: ClusterView, job: Job) -> None:
    """Count a job that now holds its GPUs (``view.cluster`` has allocated them) as running."""
    job.alloc = view.cluster.held[job.id]
    view.running[job.id] = job
    view.ranked.add(job)
    view.used_by_queue[job.queue] = view.used_by_queue.get(job.queue, 0) + job.gpus


def vacate(view: ClusterView, job: Job) -> None:
    """The reverse of :func:`occupy` (the cluster's release is the caller's)."""
    del view.running[job.id]
    view.ranked.remove(job)
    view.exposed.discard(job)
    view.used_by_queue[job.queue] -= job.gpus


def _preempt_for(policy: Policy, job: Job, victims_order: list[Job], view: ClusterView, now: float,
                 room: dict[Any, dict[int, int]]) -> list[Job] | None:
    cluster = view.cluster
    # First, without touching the cluster: could the victims make room at all?
    group = policy.preempt_class(job)
    freed = room.get(group) if group is not None else None
    if freed is None:
        freed = {}
        for victim in victims_order:
            if victim.key <= job.key:
                if view.victim_loss is None:
                    break
                continue
            if policy.may_preempt(job, victim, now):
                for node, n in victim.alloc:
                    freed[node] = freed.get(node, 0) + n
        if group is not None:
            room[group] = freed
    if not cluster.fits_after(job.gpus, freed):
        return None
    chosen: list[tuple[Job, Allocation]] = []
    by_rank = view.victim_loss is None
    for victim in victims_order:
        if victim.key <= job.key:
            if by_rank:
                break  # the rest rank as high or higher
            continue
        if not policy.may_preempt(job, victim, now):
            continue
        chosen.append((victim, cluster.release(victim.id)))
        if cluster.allocate(job.id, job.gpus) is not None:
            break
    if job.id not in cluster.held:  # even every victim it may take is not enough: undo
        for victim, alloc in reversed(chosen):
            cluster.restore(victim.id, alloc)
        return None
    # Keep the victims it does not need: hand back their GPUs where they are still free.
    needed = []
    for victim, alloc in reversed(chosen):
        if all(cluster.free[node] >= n for node, n in alloc):
            cluster.restore(victim.id, alloc)
        else:
            needed.append(victim)
    for victim in needed:
        vacate(view, victim)
    return needed
