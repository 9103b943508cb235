"""First in, first out: jobs start in submission order and are never preempted (YARN's FIFO)."""

from __future__ import annotations

from typing import Any

from shoal.platform.policies.base import Job, Policy, PolicyOptions
from shoal.registry import POLICIES


@POLICIES.register("fifo", PolicyOptions)
class Fifo(Policy):
    """Submission order, no preemption; strict (head-of-line blocking) unless ``backfill``."""

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        return (job.submit,)
