"""Least attained service with its costs bounded: LAS's average, without its starved tail or its
preemption churn. No duration knowledge.

1. Levels by attained GPU-seconds, lowest first, as :mod:`~shoal.platform.policies.las`.
2. Starvation bound: a pending job that has waited ``starve_factor`` times as long as it has run
   (and at least ``starve_after_s``) is promoted to level 0 (Tiresias' STARVE_LIMIT, made
   relative so that a long job may wait longer, but never forever).
3. Preemption bound: a job is never preempted within ``min_run_s`` of its (re)start, so a restart's
   cost is amortised over a useful run (and, optionally, at most ``max_preemptions`` times: a hard cap
   lets protected jobs block short ones, which costs the average more than the churn it saves).
4. Within a level, submission order.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from shoal.platform.policies.base import Job
from shoal.platform.policies.las import Las, LasOptions, level
from shoal.registry import POLICIES


class LasBoundedOptions(LasOptions):
    starve_factor: float = Field(2.0, gt=0, description="a pending job waiting this many times its run time so "
                                 "far is promoted to the first level")
    starve_after_s: float = Field(3600.0, ge=0, description="the least wait before a promotion (seconds)")
    max_preemptions: Optional[int] = Field(None, ge=0, description="a job preempted this many times is not "
                                           "preempted again (none: no cap)")
    min_run_s: float = Field(1800.0, ge=0, description="a job is not preempted within this many seconds of its "
                             "(re)start")


@POLICIES.register("las-bounded", LasBoundedOptions)
class LasBounded(Las):
    """LAS with a starvation bound (promotion after a relative wait) and bounded preemptions."""

    options: LasBoundedOptions

    def __init__(self, options: LasBoundedOptions | None = None):
        super().__init__(options or LasBoundedOptions())

    def _promote_at(self, job: Job) -> float:
        ran = job.attained / job.gpus
        return job.pending_since + max(self.options.starve_after_s, self.options.starve_factor * ran)

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        if job.run_start is None and now >= self._promote_at(job):
            return (0, job.submit)
        return (level(self.options.thresholds, job.attained_at(now)), job.submit)

    def next_change(self, job: Job, now: float) -> float | None:
        """Running: its next demotion, or the end of its protection; pending: its promotion."""
        if job.run_start is not None:
            # Its protection ending changes who may preempt it: a pass must run then too.
            unprotected = job.run_start + self.options.min_run_s
            demoted = super().next_change(job, now)
            if unprotected > now:
                return unprotected if demoted is None else min(unprotected, demoted)
            return demoted
        if job.key[0] == 0:
            return None
        return self._promote_at(job)

    def preemptable(self, job: Job, now: float) -> bool:
        cap = self.options.max_preemptions
        ran = now - job.run_start if job.run_start is not None else 0.0
        return ran >= self.options.min_run_s - 1e-6 and (cap is None or job.preemptions < cap)

    def may_preempt(self, job: Job, victim: Job, now: float) -> bool:
        # The pass offers only victims that are preemptable now (``view.exposed``, kept at each
        # protection's end by next_change), so only the levels are left to compare.
        return job.key[0] < victim.key[0]
