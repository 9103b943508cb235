"""Dominant resource fairness (Ghodsi et al., NSDI 2011) across queues (users, or a trace's virtual
clusters), with weights.

1. A queue's dominant share is the largest of its shares of each resource it holds, divided by
   its weight. Only GPUs are counted so far (the simulator's GPU-count mode), so it is the queue's
   share of the GPUs.
2. The next job to start is the oldest pending job of the queue with the lowest dominant share.
3. Shares are re-read after every start, so one pass spreads the free GPUs across queues.
4. No preemption: a queue above its share keeps what it runs until it finishes.
"""

from __future__ import annotations

from typing import Any, Iterator

from pydantic import Field

from shoal.platform.policies.base import ClusterView, Job, PendingQueue, Policy, PolicyOptions
from shoal.registry import POLICIES


class DrfOptions(PolicyOptions):
    backfill: bool = Field(True, description="let a later job start when an earlier one does not fit")
    weights: dict[str, float] = Field({}, description="a queue's weight (default 1): its fair share is "
                                      "weight / sum of the weights of queues with work")


@POLICIES.register("drf", DrfOptions)
class Drf(Policy):
    """Lowest weighted dominant share first across queues, oldest first within one; no preemption."""

    options: DrfOptions

    def __init__(self, options: DrfOptions | None = None):
        super().__init__(options or DrfOptions())
        if any(w <= 0 for w in self.options.weights.values()):
            raise ValueError(f"drf.weights: every weight must be positive, got {self.options.weights}")

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        return (job.submit,)

    def share(self, queue: str, view: ClusterView) -> float:
        return view.used_by_queue.get(queue, 0) / view.cluster.gpus / self.options.weights.get(queue, 1.0)

    def pending_order(self, pending: PendingQueue, view: ClusterView) -> Iterator[Job]:
        heads = {q: 0 for q, jobs in pending.by_queue.items() if jobs.jobs}
        while heads:
            queue = min(heads, key=lambda q: (self.share(q, view), pending.by_queue[q].jobs[heads[q]].submit))
            jobs = pending.by_queue[queue].jobs
            yield jobs[heads[queue]]
            heads[queue] += 1
            if heads[queue] >= len(jobs):
                del heads[queue]
