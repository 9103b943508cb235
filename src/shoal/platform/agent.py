"""The service's scheduler: the policy objects of :mod:`shoal.platform.policies` on this machine's CPUs.

Every tick (``tick_s``) it reaps; it passes (step 2) at once after a submit, a change or an exit, and
otherwise every ``idle_pass_s`` (a policy's keys move with time), so a long queue costs little while
nothing happens:

1. Reap: a job whose first process (:mod:`shoal.platform.shim`) has exited is done (status 0),
   failed (any other status, with the reason: the kernel's OOM killer, a signal, an exit code), or,
   when the service had stopped it for a preemption or a resize, pending again, to resume from its
   checkpoint. A stopping job past ``grace_s`` is killed.
2. Schedule: the pending jobs and the running ones become policy jobs (the scheduled unit is a CPU;
   a job's gang is workers x CPUs per worker, with its memory and GPUs checked beside it) and one
   :func:`~shoal.platform.policies.base.schedule` pass decides, exactly as in the simulator. Started
   jobs get their CPU set, memory limit and GPUs; victims (among those the policy allows, the ones that
   would lose least work first: a train job its restart, a command job all it has run) get SIGTERM (a ``shoal train`` job writes a
   checkpoint at its next step boundary and exits). While a preemption is in flight no further
   victims are chosen, so one claim never stops more jobs than it needs.
3. Grow: when nothing is left waiting, an elastic job below its ``max_workers`` that has run
   ``grow_after_s`` is stopped and restarted at the largest size that now fits.

On start, the jobs the database says are running are adopted again: the shim's pid and start time
name the same live process, or its ``exit.json`` says how it ended meanwhile, or (neither) it died
with the machine and goes back to pending, to resume from its checkpoint.
"""

from __future__ import annotations

import collections
import heapq
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shoal.platform.cluster import PlacementError
from shoal.platform.node import Cgroups, Node
from shoal.platform.policies.base import Job, PendingQueue, Policy, Sorted, expose, occupy, schedule
from shoal.platform.pool import NodePool, View, WithinQuota, held_cpus, needs
from shoal.platform.process import is_shim, job_argv, read_json, why_failed
from shoal.platform.shim import EXIT, SHIM, proc_start
from shoal.platform.spec import JobSpec
from shoal.platform.store import CANCELLED, DONE, FAILED, PENDING, RUNNING, STOPPING, JobStore, spec_of
from shoal.sql import checkpoint

log = logging.getLogger("shoal.serve")
CHECKPOINT_S = 5.0  # seconds between copies of SQLite's write-ahead log into the database
RECHECK_S = 2.0  # seconds of changes reread each tick, for a transaction that committed after a later one
TRAIN_RESTART_S = 10.0  # what resuming a shoal train job costs (measured: 5.7 s on 2 cores, BENCHMARKS.md)
PREEMPTED_EXIT = 143  # a shoal train job stopped by SIGTERM at a step boundary, its checkpoint written


class Agent:
    """Runs ``store``'s jobs on ``node`` under ``policy``; :meth:`tick` once, or :meth:`start` a thread."""

    def __init__(self, store: JobStore, node: Node, policy: Policy, state: Path, *, cgroups: Cgroups,
                 share_by: str = "user", tick_s: float = 0.5, grace_s: float = 60.0, grow_after_s: float = 30.0,
                 check: bool = False):
        self.store, self.node, self.policy, self.state = store, node, policy, state
        self.cgroups, self.share_by, self.check = cgroups, share_by, check
        self.tick_s, self.grace_s, self.grow_after_s = tick_s, grace_s, grow_after_s
        self.children: dict[int, subprocess.Popen] = {}  # job id -> its shim, when this process started it
        self.waiting: dict[int, str] = {}  # pending job -> why it waits
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=2000)  # use after each pass
        self.positions: dict[int, int] = {}  # pending job -> its place in the last pass's order (1: next)
        self.specs: dict[int, JobSpec] = {}
        # What the scheduler knows between passes, kept from the rows that changed (``store.changed_since``)
        # rather than reread in full: the active rows, and the pending jobs sorted by the policy's key.
        self.rows: dict[int, dict[str, Any]] = {}
        self.holding: set[int] = set()  # the running and stopping jobs among them
        self.pending = PendingQueue()
        self.queued: dict[int, Job] = {}
        self._rekeys: list[tuple[float, int]] = []  # (when, job): a pending job's key changes with time
        self._seen: float | None = None
        self._free = (node.slots, node.memory_mb, node.gpus)  # after the last pass, for why a job waits
        self._quota_held: dict[int, str] = {}
        self.pass_s: list[float] = []  # the last passes' durations, reading the database included
        self.decide_s: list[float] = []  # the policy's decisions in them (schedule() alone)
        self.wake = threading.Event()
        self.idle_pass_s = max(5 * tick_s, 2.0)
        self._dirty, self._last_pass, self._checkpointed = True, 0.0, 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        (state / "jobs").mkdir(parents=True, exist_ok=True)

    # The loop.

    def start(self) -> None:
        self.adopt()
        self._thread = threading.Thread(target=self._loop, name="shoal-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop scheduling; running jobs keep running (a restarted service adopts them)."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end scheduling; it is logged and retried
                log.exception("scheduler tick failed")
            began = time.monotonic()
            self.wake.wait(self.tick_s)
            self.wake.clear()
            # A burst of pokes (submits) is one tick, not one each: at least a fifth of a tick apart.
            rest = began + self.tick_s / 5 - time.monotonic()
            if rest > 0 and not self._stop.is_set():
                time.sleep(rest)

    def poke(self) -> None:
        """Something changed (a submit, a cancel, a priority): pass at once."""
        self._dirty = True
        self.wake.set()

    def tick(self, now: float | None = None) -> None:
        """Reap every tick; pass when something changed, or every ``idle_pass_s`` (keys move with time)."""
        with self._lock:
            now = time.time() if now is None else now
            self._refresh()
            if now - self._checkpointed >= CHECKPOINT_S:
                checkpoint(self.store.engine)
                self._checkpointed = now
            ended = self._reap(now)
            if ended:
                self._refresh()
            since = now - self._last_pass
            # Changes coalesce: at most one pass a tick, however many submits arrive in it.
            if not ((ended or self._dirty) and since >= self.tick_s * 0.9 or since >= self.idle_pass_s):
                return
            self._dirty, self._last_pass = False, now
            self._schedule(now)
            if self.check:
                self._check()

    def _check(self) -> None:
        """Gang scheduling's invariant on what really runs: every running job holds exactly its workers x
        CPUs, no CPU or GPU is held twice, and nothing holds more than the node has."""
        seen_cpus: set[int] = set()
        seen_gpus: set[int] = set()
        memory = 0
        for row in self.store.jobs(states=(RUNNING, STOPPING)):
            spec = spec_of(row)
            cpus, gpus = _ids(row["cpus"]), _ids(row["gpus"])
            if len(cpus) != row["workers"] * spec.resources.cpus or len(gpus) != needs(spec, row["workers"])[1]:
                raise PlacementError(f"job {row['id']} holds {len(cpus)} CPUs and {len(gpus)} GPUs, not its gang's")
            if seen_cpus & set(cpus) or seen_gpus & set(gpus):
                raise PlacementError(f"job {row['id']} holds a CPU or GPU another job holds")
            seen_cpus |= set(cpus)
            seen_gpus |= set(gpus)
            memory += needs(spec, row["workers"])[0]
        if len(seen_cpus) > self.node.slots or memory > self.node.memory_mb:
            raise PlacementError("the running jobs hold more than the node has")

    def job_dir(self, job: int) -> Path:
        return self.state / "jobs" / str(job)

    # Adoption after a restart.

    def adopt(self) -> None:
        for row in self.store.jobs(states=(RUNNING, STOPPING)):
            shim = read_json(self.job_dir(row["id"]) / SHIM)
            if shim is not None and shim.get("attempt") == row["attempt"] and shim.get("start") is not None \
                    and proc_start(shim["pid"]) == shim["start"]:
                if row["pid"] != shim["pid"]:
                    self.store.change(row["id"], pid=shim["pid"])
                    row = {**row, "pid": shim["pid"]}
                if row["state"] == STOPPING:  # its SIGTERM may not have been sent before the service died
                    self._signal(row, signal.SIGTERM)
                log.info("job %d: adopted (pid %d)", row["id"], shim["pid"])
                continue
            if shim is None and row["pid"] is not None and is_shim(row["pid"]):
                log.info("job %d: adopted while starting (pid %d)", row["id"], row["pid"])
                continue
            if self._exit_status(row) is None:  # neither running nor ended by itself: it died with its host
                self._requeue(row, time.time(), "lost while the service was down; queued again", lost=True)

    # Reaping.

    def _alive(self, row: dict[str, Any]) -> bool:
        child = self.children.get(row["id"])
        if child is not None:
            return child.poll() is None
        shim = read_json(self.job_dir(row["id"]) / SHIM)
        if shim is None or shim.get("attempt") != row["attempt"]:
            return row["pid"] is not None and is_shim(row["pid"])  # started, its shim.json not written yet
        return proc_start(shim["pid"]) == shim.get("start")

    def _exit_status(self, row: dict[str, Any]) -> dict[str, Any] | None:
        status = read_json(self.job_dir(row["id"]) / EXIT)
        return status if status is not None and status.get("attempt") == row["attempt"] else None

    def _reap(self, now: float) -> bool:
        """Handle the jobs whose processes have ended; returns whether any had."""
        ended = False
        for row in [self.rows[job] for job in sorted(self.holding)]:
            if self._alive(row):
                if row["state"] == STOPPING and now - (row["stop_at"] or now) > self.grace_s:
                    self._signal(row, signal.SIGKILL)
                continue
            ended = True
            self.children.pop(row["id"], None)
            status = self._exit_status(row)
            code = status["returncode"] if status is not None else None
            oom = self.cgroups.oom_kills(row["id"])
            self.cgroups.remove(row["id"])
            ran = _ran(row, now)
            if row["state"] == STOPPING and row["stop"] == "cancel":
                self._end(row, CANCELLED, now, code, "cancelled", ran)
            elif code == 0:
                self._end(row, DONE, now, code, "finished", ran)
            elif row["state"] == STOPPING and row["stop"] in ("preempt", "resize") and not oom and (
                    code in (PREEMPTED_EXIT, -signal.SIGTERM, None) or row["kind"] == "command"):
                why = "preempted" if row["stop"] == "preempt" else "stopped to resize"
                self._requeue(row, now, f"{why}; queued again (exit status {code})")
            else:
                self._end(row, FAILED, now, code, why_failed(code, oom, self.specs[row["id"]], row["workers"]), ran)
        return ended

    def _end(self, row: dict[str, Any], state: str, now: float, code: int | None, note: str, ran: float) -> None:
        self.store.change(row["id"], f"{note} (exit status {code})" if code is not None else note,
                          state=state, finished=now, exit_code=code, reason=note, pid=None, cpus=None, gpus=None,
                          attained=row["attained"] + ran, stop=None, stop_at=None)
        log.info("job %d: %s", row["id"], note)

    def _requeue(self, row: dict[str, Any], now: float, note: str, *, lost: bool = False) -> None:
        ran = 0.0 if lost else _ran(row, now)
        preempted = row["stop"] == "preempt"
        self.store.change(row["id"], note, state=PENDING, pid=None, cpus=None, gpus=None, stop=None, run_start=None,
                          stop_at=None, attained=row["attained"] + ran, pending_since=now,
                          preemptions=row["preemptions"] + int(preempted))
        self.cgroups.remove(row["id"])
        log.info("job %d: %s", row["id"], note)

    # Scheduling.

    def _refresh(self) -> None:
        """Bring ``rows`` and the pending queue up to date with the rows changed since the last look (a few
        seconds more, for a transaction that committed late)."""
        first = self._seen is None
        looked = time.time()
        changed = self.store.active() if first else self.store.changed_since(self._seen - RECHECK_S)
        self._seen = looked
        self._load_specs([r for r in changed if r["state"] in (PENDING, RUNNING, STOPPING)])
        for row in changed:
            job = row["id"]
            if self.rows.get(job) == row:
                continue
            if job in self.queued:
                self.pending.remove(self.queued.pop(job))
            if row["state"] in (PENDING, RUNNING, STOPPING):
                self.rows[job] = row
            else:
                self.rows.pop(job, None)
                self.specs.pop(job, None)
            if row["state"] in (RUNNING, STOPPING):
                self.holding.add(job)
            else:
                self.holding.discard(job)
            if row["state"] == PENDING:
                self._queue(row, looked)

    def _queue(self, row: dict[str, Any], now: float) -> None:
        spec = self.specs[row["id"]]
        job = self._policy_job(row, spec, self._size(row, spec, None))
        job.key = self.policy.key(job, now)
        self.pending.add(job)
        self.queued[job.id] = job
        change = self.policy.next_change(job, now)
        if change is not None:
            heapq.heappush(self._rekeys, (change, job.id))

    def _schedule(self, now: float) -> None:
        started = time.perf_counter()
        while self._rekeys and self._rekeys[0][0] <= now:  # keys that time has moved
            _, job = heapq.heappop(self._rekeys)
            if job in self.queued:
                self.pending.remove(self.queued.pop(job))
                self._queue(self.rows[job], now)
        active = [self.rows[job] for job in sorted(self.holding)]
        pool = NodePool(self.node)
        view = View(pool, {}, Sorted(), Sorted(), {}, self._loss)
        stopping = False
        used_by_user: dict[str, int] = {}
        for row in active:
            spec = self.specs[row["id"]]
            job = self._policy_job(row, spec, row["workers"])
            pool.needs[job.id] = needs(spec, row["workers"])
            if pool.allocate(job.id, job.gpus) is None:  # more running than the node holds (a smaller node now)
                log.warning("job %d: holds more than this node has free", job.id)
                continue
            job.key = self.policy.key(job, now)
            occupy(view, job)
            used_by_user[row["user"]] = used_by_user.get(row["user"], 0) + job.gpus
            if row["state"] == STOPPING:
                stopping = True
            else:
                expose(view, self.policy, job, now)
        if stopping:  # a preemption is in flight: wait for it before choosing more victims
            view.exposed = Sorted()
        limits = {u["name"]: u["quota_cpus"] for u in self.store.users()}
        quota_room = {user: limit - used_by_user.get(user, 0) for user, limit in limits.items() if limit is not None}
        for job in self.queued.values():
            row = self.rows[job.id]
            spec = self.specs[job.id]
            if spec.elastic and row["want_workers"] is None:  # its size is what fits now, within its quota
                room = quota_room.get(row["user"])
                job.gpus = self._size(row, spec, pool, room) * spec.resources.cpus
            pool.needs[job.id] = needs(spec, job.gpus // spec.resources.cpus)
        quota = WithinQuota(self.policy, limits, used_by_user, {job: self.rows[job]["user"] for job in self.queued})
        decided = time.perf_counter()
        decision = schedule(quota, self.pending, view, now)
        self.decide_s = (self.decide_s + [time.perf_counter() - decided])[-100:]
        for victim in decision.preempt:
            self._stop_job(victim.id, "preempt", now, "preempted for a job ranked higher")
        # What is free now, before any victim has gone: a job the pass placed in a victim's room starts
        # once the victim has checkpointed and exited (a later pass), never on top of it.
        busy = {c for row in active for c in _ids(row["cpus"])}  # what every process holds, placed or not
        free = [c for c in range(self.node.slots) if c not in busy]
        busy_gpus = {g for row in active for g in _ids(row["gpus"])}
        free_gpus = [g for g in range(self.node.gpus) if g not in busy_gpus]
        memory_free = self.node.memory_mb - sum(needs(self.specs[r["id"]], r["workers"])[0] for r in active)
        blocked: dict[int, str] = {}
        for job in decision.start:
            row, spec = self.rows[job.id], self.specs[job.id]
            workers = job.gpus // spec.resources.cpus
            memory, devices = needs(spec, workers)
            if job.gpus > len(free) or memory > memory_free or devices > len(free_gpus):
                blocked[job.id] = "starting once the jobs preempted for it have checkpointed and exited"
                continue
            slots, free = free[:job.gpus], free[job.gpus:]
            gpus, free_gpus = free_gpus[:devices], free_gpus[devices:]
            memory_free -= memory
            self.pending.remove(self.queued.pop(job.id))
            try:
                self._launch(row, spec, workers, slots, gpus, now)
            except Exception as err:  # it could not be started (a cgroup, its config): it fails, saying why
                log.exception("job %d: could not be started", job.id)
                self.cgroups.remove(job.id)
                self.store.change(job.id, f"could not be started: {err}", state=FAILED, finished=now,
                                  reason=f"could not be started: {type(err).__name__}: {err}", pid=None, cpus=None,
                                  gpus=None)
        self._free = (len(free), memory_free, len(free_gpus))
        self.history.append({"at": now, "cpus_used": self.node.slots - len(free),
                             "memory_used_mb": self.node.memory_mb - memory_free, "pending": len(self.queued),
                             "running": len(active) + len(decision.start) - len(blocked)})
        self._quota_held, self.waiting = quota.held, blocked
        if not self.queued and not stopping and not decision.start:
            self._grow(active, pool, now, quota_room)
        self.positions = {job.id: i + 1 for i, job in enumerate(self.pending.jobs)}
        self.pass_s = (self.pass_s + [time.perf_counter() - started])[-100:]

    def _loss(self, job: Job, now: float) -> float:
        """CPU-seconds of work a preemption would cost ``job``: a train job checkpoints at its next step and
        pays only its restart; a command job loses everything since it started."""
        if self.specs[job.id].kind == "train":
            return job.gpus * TRAIN_RESTART_S
        return job.gpus * (now - (job.run_start or now))

    def why_waiting(self, job: int) -> str:
        """Why a pending job has not started, as of the last pass."""
        if job in self.waiting:
            return self.waiting[job]
        if job in self._quota_held:
            return self._quota_held[job]
        queued = self.queued.get(job)
        if queued is None:
            return "not yet considered by the scheduler"
        cpus, memory_free, gpus_free = self._free
        memory, devices = needs(self.specs[job], queued.gpus // self.specs[job].resources.cpus)
        if queued.gpus > cpus:
            return f"waiting for {queued.gpus} CPUs ({cpus} free)"
        if memory > memory_free:
            return f"waiting for {memory} MiB of memory ({memory_free} free)"
        if devices > gpus_free:
            return f"waiting for {devices} GPUs ({gpus_free} free)"
        return "behind a job ranked higher, or a preemption in flight"

    def _load_specs(self, active: list[dict[str, Any]]) -> None:
        """Specs never change once submitted: each is parsed once (and forgotten when its job has ended)."""
        missing = [row["id"] for row in active if row["id"] not in self.specs]
        if missing:
            self.specs.update(self.store.specs(missing))

    def _policy_job(self, row: dict[str, Any], spec: JobSpec, workers: int) -> Job:
        queue = row["user"] if self.share_by == "user" else row["queue"]
        return Job(row["id"], row["submitted"], workers * spec.resources.cpus, queue, row["priority"],
                   attained=row["attained"], run_start=row["run_start"] if row["state"] != PENDING else None,
                   first_start=row["first_start"], pending_since=row["pending_since"] or row["submitted"],
                   preemptions=row["preemptions"])

    def _size(self, row: dict[str, Any], spec: JobSpec, pool: NodePool | None, room: int | None = None) -> int:
        """Workers to start a pending job with: a resize's size, else the most that fit now (at least the
        fewest it runs on)."""
        if row["want_workers"] is not None:
            return row["want_workers"]
        if not spec.elastic:
            return row["workers"] or spec.fewest  # a resize keeps its size for later runs
        if pool is None:
            return spec.fewest
        for workers in range(spec.most, spec.fewest, -1):
            memory, devices = needs(spec, workers)
            if workers * spec.resources.cpus <= min(pool.free_total, room if room is not None else pool.free_total) \
                    and memory <= pool.memory_free \
                    and devices <= pool.gpus_free:
                return workers
        return spec.fewest

    def _grow(self, active: list[dict[str, Any]], pool: NodePool, now: float, quota_room: dict[str, int]) -> None:
        for row in active:
            if row["state"] != RUNNING or row["want_workers"] is not None:
                continue
            spec = self.specs[row["id"]]
            if not spec.elastic or row["workers"] >= spec.most or now - row["run_start"] < self.grow_after_s:
                continue
            room = min(pool.free_total, quota_room.get(row["user"], pool.free_total))
            more = min(spec.most - row["workers"], room // spec.resources.cpus)
            memory, devices = needs(spec, more)
            if more >= 1 and memory <= pool.memory_free and devices <= pool.gpus_free:
                self._stop_job(row["id"], "resize", now, f"growing from {row['workers']} to "
                               f"{row['workers'] + more} workers (room is free)")
                return  # one at a time: the next pass sees what is left

    # Acting on jobs.

    def _launch(self, row: dict[str, Any], spec: JobSpec, workers: int, slots: list[int], devices: list[int],
                now: float) -> bool:
        job, attempt = row["id"], row["attempt"] + 1
        jd = self.job_dir(job)
        jd.mkdir(parents=True, exist_ok=True)
        for name in (EXIT, SHIM):
            (jd / name).unlink(missing_ok=True)
        cpus = tuple(self.node.cpus[s] for s in slots)
        memory = needs(spec, workers)[0]
        paths = self.cgroups.create(job, cpus, memory) if self.cgroups.mode else []
        argv = job_argv(spec, workers, jd)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, devices)), SHOAL_JOB_ID=str(job),
                   SHOAL_JOB_WORKERS=str(workers), OMP_NUM_THREADS=str(max(1, spec.resources.cpus)))
        if spec.kind == "command" and spec.workdir:
            env["SHOAL_JOB_CWD"] = spec.workdir
        # The row says "running" before the process exists, so a crash between the two never starts a job
        # twice: a restarted service finds no shim of this attempt and queues it again.
        if not self.store.change(job, f"started on {workers} workers (CPUs {_fmt(slots)}"
                                 + (f", GPUs {_fmt(devices)})" if devices else ")"),
                                 where_state=(PENDING,), state=RUNNING, attempt=attempt, workers=workers,
                                 cpus=_fmt(slots), gpus=_fmt(devices), run_start=now,
                                 first_start=row["first_start"] or now, pid=None):
            self.cgroups.remove(job)
            return False  # cancelled meanwhile
        child = subprocess.Popen([sys.executable, "-m", "shoal.platform.shim", str(jd), str(attempt), *map(str, paths),
                                  "--", *argv], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=open(jd / "shim.err", "ab"))
        self.children[job] = child
        self.store.change(job, pid=child.pid)
        log.info("job %d: started (attempt %d, %d workers)", job, attempt, workers)
        return True

    def _stop_job(self, job: int, why: str, now: float, note: str) -> None:
        row = self.store.job(job)
        if row is None or not self.store.change(job, note, where_state=(RUNNING,), state=STOPPING, stop=why,
                                                stop_at=now):
            return
        self._signal(row, signal.SIGTERM)

    def _signal(self, row: dict[str, Any], sig: signal.Signals) -> None:
        shim = read_json(self.job_dir(row["id"]) / SHIM)
        pid = row["pid"] or (shim or {}).get("pid")
        if pid is None or (shim is not None and proc_start(pid) != shim.get("start")):
            return
        try:
            os.killpg(pid, sig)  # the shim leads the job's session and process group
        except ProcessLookupError:
            pass

    # Requests from the API.

    def cancel(self, job: int) -> str:
        with self._lock:
            row = self.store.job(job)
            if row is None:
                raise KeyError(job)
            if row["state"] == PENDING:
                self.store.change(job, "cancelled while pending", where_state=(PENDING,), state=CANCELLED,
                                  finished=time.time(), reason="cancelled")
                return CANCELLED
            if row["state"] in (RUNNING, STOPPING):
                if row["state"] == RUNNING:
                    self.store.change(job, "cancel requested", where_state=(RUNNING,), state=STOPPING, stop="cancel",
                                      stop_at=time.time())
                else:
                    self.store.change(job, "cancel requested", stop="cancel")
                self._signal(row, signal.SIGTERM)
                self.poke()
                return STOPPING
            return row["state"]

    def resize(self, job: int, workers: int) -> str:
        with self._lock:
            row = self.store.job(job)
            if row is None:
                raise KeyError(job)
            self.store.change(job, f"resize to {workers} workers requested", want_workers=workers)
            if row["state"] == RUNNING and row["workers"] != workers:
                self._stop_job(job, "resize", time.time(), f"stopping to resize to {workers} workers")
            self.poke()
            return (self.store.job(job) or row)["state"]


def _ran(row: dict[str, Any], now: float) -> float:
    """CPU-seconds a running job has run since its current run began."""
    return held_cpus(row) * (now - (row["run_start"] or now))


def _ids(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def _fmt(ids: list[int]) -> str:
    return ",".join(map(str, ids))
