"""``shoal sched simulate``: replay a cluster trace through a scheduling policy.

The policy objects are the platform's (:mod:`shoal.platform.policies`, meant for a service
too); only time is simulated. The model, in GPU-count mode:

1. Jobs arrive at their (load-scaled) submission times asking for a gang of GPUs; a job of fewer
   GPUs than a node goes on one node, a larger one on whole nodes (:class:`~shoal.platform.cluster.Cluster`).
2. At every instant where something happens (arrivals, completions, a job's policy key changing),
   the events of that instant are applied and then one scheduling pass runs
   (:func:`~shoal.platform.policies.base.schedule`).
3. A running job finishes after its trace duration of running time. A preempted job keeps the work
   it did and pays ``restart_cost`` seconds again when it resumes (reloading its checkpoint).
4. A job that no placement on the empty cluster could ever hold is refused and counted, not queued.

Reported per policy and load: job completion time (JCT: finish - submission) mean, p50, p95 and
p99; makespan; queueing delay (first start - submission); GPU utilisation over the makespan;
preemptions per job; and per queue (the trace's virtual clusters) the mean slowdown, JCT over the
job's own duration, whose worst queue is the fairness figure.
"""

from __future__ import annotations

import csv
import heapq
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from shoal.platform.cluster import Cluster
from shoal.platform.policies.base import Job, PendingQueue, Policy, Sorted, expose, schedule, vacate

FINISH, ARRIVE, REKEY = 0, 1, 2  # at one instant: free GPUs first, then queue, then re-rank
COLUMNS = ["label", "jobs", "avg_jct_h", "avg_jct_vs_first", "p50_jct_h", "p95_jct_h", "p99_jct_h", "avg_queue_h",
           "makespan_h", "utilisation", "preemptions_per_job", "worst_queue_slowdown", "worst_queue"]


@dataclass(frozen=True)
class TraceJob:
    id: int
    submit: float  # seconds after the window's start
    duration: float  # seconds of running
    gpus: int
    queue: str
    priority: int = 0


def with_priorities(trace: list[TraceJob], share: float, seed: int = 0) -> list[TraceJob]:
    """The Philly trace has no priorities: ``share`` of its jobs, drawn with ``seed``, get priority 1."""
    if not 0 <= share <= 1:
        raise ValueError(f"--high-priority: {share} is outside [0, 1]")
    high = np.random.default_rng(seed).random(len(trace)) < share
    return [TraceJob(t.id, t.submit, t.duration, t.gpus, t.queue, int(h)) for t, h in zip(trace, high)]


def read_philly(path: str | Path, window: tuple[datetime, datetime] | None = None) -> list[TraceJob]:
    """The Philly trace's rows (``timestamp,duration,num_gpus,gpu_time,cluster``) submitted within
    ``window`` (start inclusive, end exclusive), in submission order; times from the first one."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"timestamp", "duration", "num_gpus", "cluster"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a Philly trace, columns {sorted(missing)} are missing")
        for line, row in enumerate(reader, start=2):
            try:
                at = datetime.fromisoformat(row["timestamp"])
                duration, gpus = float(row["duration"]), int(row["num_gpus"])
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            if window is not None and not window[0] <= at < window[1]:
                continue
            if duration > 0 and gpus > 0:
                rows.append((at, duration, gpus, row["cluster"]))
    if not rows:
        raise ValueError(f"{path}: no job with a positive duration and GPU count in the window")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [TraceJob(i, (at - t0).total_seconds(), duration, gpus, queue)
            for i, (at, duration, gpus, queue) in enumerate(rows)]


def parse_window(text: str) -> tuple[datetime, datetime]:
    """``2017-10-01:2017-10-14`` -> [Oct 1 00:00, Oct 15 00:00): both days included."""
    try:
        first, last = (datetime.fromisoformat(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--window: {text!r} is not FIRST:LAST as two dates (2017-10-01:2017-10-14)") from None
    if last < first:
        raise ValueError(f"--window: {text!r} ends before it starts")
    return first, last + timedelta(days=1)


class Simulation:
    """One policy over one trace on one cluster; :meth:`run` returns the finished jobs."""

    def __init__(self, policy: Policy, gpus: int, *, per_node: int = 8, restart_cost: float = 60.0,
                 check: bool = False):
        self.policy, self.restart_cost, self.check = policy, restart_cost, check
        self.cluster = Cluster(gpus, per_node)
        self.running: dict[int, Job] = {}
        self.ranked = Sorted()
        self.exposed = Sorted()
        self.used_by_queue: dict[str, int] = {}
        self.victim_loss = None  # every victim pays the same restart cost and keeps its work
        self.pending = PendingQueue()
        self.events: list[tuple[float, int, int, Job, int]] = []
        self.refused: list[TraceJob] = []
        self.passes = 0
        self.busy_gpu_s = 0.0

    def run(self, trace: Iterable[TraceJob]) -> list[Job]:
        jobs = []
        for tj in trace:
            if not self.cluster.could_ever_fit(tj.gpus):
                self.refused.append(tj)
                continue
            job = Job(tj.id, tj.submit, tj.gpus, tj.queue, tj.priority, work_left=tj.duration,
                      pending_since=tj.submit)
            jobs.append(job)
            self._at(tj.submit, ARRIVE, job)
        while self.events:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, kind, _, job, token = heapq.heappop(self.events)
                if token == job.token:
                    self._apply(kind, job, now)
            self._pass(now)
        unfinished = [j.id for j in jobs if j.finished is None]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} jobs never finished (first: {unfinished[:5]}): a policy bug")
        return jobs

    def _at(self, t: float, kind: int, job: Job) -> None:
        heapq.heappush(self.events, (t, kind, job.id, job, job.token))

    def _rekey_later(self, job: Job, now: float) -> None:
        change = self.policy.next_change(job, now)
        if change is not None:
            self._at(max(change, now), REKEY, job)

    def _apply(self, kind: int, job: Job, now: float) -> None:
        if kind == FINISH:
            self.cluster.release(job.id)
            vacate(self, job)
            self.busy_gpu_s += job.gpus * (now - job.run_start)
            job.attained, job.run_start, job.finished = job.attained_at(now), None, now
            job.token += 1
        elif kind == ARRIVE:
            job.key = self.policy.key(job, now)
            self.pending.add(job)
            self._rekey_later(job, now)
        else:
            if job.run_start is None:
                self.pending.remove(job)
                job.key = self.policy.key(job, now)
                self.pending.add(job)
            else:
                self._rerank(job, now)
            job.token += 1
            self._rekey_later(job, now)
            if job.run_start is not None:  # a rekey of a running job leaves its finish standing
                self._at(now + job.work_left - (now - job.run_start), FINISH, job)

    def _pass(self, now: float) -> None:
        if not self.pending:
            return
        self.passes += 1
        decision = schedule(self.policy, self.pending, self, now)
        for job in decision.start:
            self.pending.remove(job)
        for job in decision.preempt:
            ran = now - job.run_start
            self.busy_gpu_s += job.gpus * ran
            job.attained = job.attained_at(now)
            job.work_left += self.restart_cost - ran
            job.run_start, job.pending_since = None, now
            job.preemptions += 1
            job.token += 1
            job.key = self.policy.key(job, now)
            self.pending.add(job)
            self._rekey_later(job, now)
        for job in decision.start:
            if job.first_start is None:
                job.first_start = now
            job.run_start = now
            job.token += 1
            self._rerank(job, now)
            self._at(now + job.work_left, FINISH, job)
            self._rekey_later(job, now)
        if self.check:
            self._check()

    def _rerank(self, job: Job, now: float) -> None:
        """A running job's key afresh, in the ranking and among the exposed."""
        self.ranked.remove(job)
        self.exposed.discard(job)
        job.key = self.policy.key(job, now)
        self.ranked.add(job)
        expose(self, self.policy, job, now)

    def _check(self) -> None:
        """Gang scheduling's invariant after a decision: every running job holds exactly its GPUs."""
        self.cluster.check()
        for job in self.running.values():
            held = sum(n for _, n in self.cluster.held[job.id])
            if held != job.gpus:
                raise AssertionError(f"job {job.id} holds {held} of its {job.gpus} GPUs")
        if set(self.running) != set(self.cluster.held):
            raise AssertionError("the running jobs and the cluster's allocations differ")


def summarise(jobs: list[Job], durations: dict[int, float], sim: Simulation, gpus: int) -> dict[str, Any]:
    """The figures of one run (hours where the name says ``_h``)."""
    jct = np.array([j.finished - j.submit for j in jobs])
    queued = np.array([j.first_start - j.submit for j in jobs])
    start = min(j.submit for j in jobs)
    makespan = max(j.finished for j in jobs) - start
    slowdown: dict[str, list[float]] = {}
    for j, c in zip(jobs, jct):
        slowdown.setdefault(j.queue, []).append(c / durations[j.id])
    per_queue = {q: float(np.mean(v)) for q, v in slowdown.items()}
    worst = max(per_queue, key=per_queue.__getitem__)
    hours = 3600.0
    return {"jobs": len(jobs), "refused": len(sim.refused), "avg_jct_h": float(jct.mean()) / hours,
            "p50_jct_h": float(np.percentile(jct, 50)) / hours, "p95_jct_h": float(np.percentile(jct, 95)) / hours,
            "p99_jct_h": float(np.percentile(jct, 99)) / hours, "makespan_h": makespan / hours,
            "avg_queue_h": float(queued.mean()) / hours, "utilisation": sim.busy_gpu_s / (gpus * makespan),
            "preemptions_per_job": sum(j.preemptions for j in jobs) / len(jobs),
            "worst_queue_slowdown": per_queue[worst], "worst_queue": worst, "queue_slowdown": per_queue,
            "passes": sim.passes}


def run_one(policy: Policy, trace: list[TraceJob], *, gpus: int, load: float, restart_cost: float,
            per_node: int = 8, check: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """One (policy, load) run: its summary and its sorted JCTs (hours) for the CDF."""
    scaled = [TraceJob(t.id, t.submit / load, t.duration, t.gpus, t.queue, t.priority) for t in trace]
    sim = Simulation(policy, gpus, per_node=per_node, restart_cost=restart_cost, check=check)
    started = time.perf_counter()
    jobs = sim.run(scaled)
    summary = summarise(jobs, {t.id: t.duration for t in trace}, sim, gpus)
    summary["wall_s"] = time.perf_counter() - started
    return summary, np.sort([(j.finished - j.submit) / 3600.0 for j in jobs])


def plot_cdf(curves: dict[str, np.ndarray], out: Path, load: float) -> Path:
    """JCT CDFs, one line per policy, log-scaled hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, jct in curves.items():
        ax.plot(np.maximum(jct, 1e-3), np.arange(1, len(jct) + 1) / len(jct), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(f"JCT CDF at load {load:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / f"jct-cdf-load{load:g}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_all(make_policy: Callable[[str], Policy], names: list[str], trace: list[TraceJob], *, gpus: int,
            loads: list[float], restart_cost: float, out: Path, per_node: int = 8, check: bool = False,
            log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every policy at every load; rows in the bench report's shape, and one CDF plot per load."""
    rows, images = [], []
    for load in loads:
        curves = {}
        for name in names:
            summary, curves[name] = run_one(make_policy(name), trace, gpus=gpus, load=load, per_node=per_node,
                                            restart_cost=restart_cost, check=check)
            rows.append({"label": f"{name}@{load:g}", "policy": name, "load": load, "failed": False, **summary})
            log(f"{name} at load {load:g}: avg JCT {summary['avg_jct_h']:.2f} h (p99 {summary['p99_jct_h']:.1f} h), "
                f"utilisation {summary['utilisation']:.2f}, {summary['preemptions_per_job']:.2f} preemptions a job, "
                f"worst queue slowdown {summary['worst_queue_slowdown']:.1f} ({summary['wall_s']:.1f} s)")
        images.append(plot_cdf(curves, out, load))
    baseline = {r["load"]: r for r in rows if r["policy"] == names[0]}
    for row in rows:
        row["avg_jct_vs_first"] = row["avg_jct_h"] / baseline[row["load"]]["avg_jct_h"]
    return rows, images


