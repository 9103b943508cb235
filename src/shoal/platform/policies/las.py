"""Discretised least attained service (Tiresias, Gu et al., NSDI 2019): no duration knowledge.

1. A job's attained service is the GPU-seconds it has run (GPUs x time: the "2D" of 2D-LAS).
2. The thresholds cut it into levels; a job starts at level 0 and moves down a level when its
   attained service crosses the next threshold.
3. Lower levels run first; within a level, submission order (FIFO, as Tiresias keeps it).
4. A pending job preempts running jobs of a strictly higher level, never of its own.
"""

from __future__ import annotations

import bisect
from typing import Any

from pydantic import Field, field_validator

from shoal.platform.policies.base import Job, Policy, PolicyOptions
from shoal.registry import POLICIES


class LasOptions(PolicyOptions):
    backfill: bool = Field(True, description="let a later job start when an earlier one does not fit")
    thresholds: list[float] = Field([3600.0], min_length=1, description="GPU-seconds of attained service at "
                                    "which a job moves down a level (one threshold: two levels)")

    @field_validator("thresholds")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(t <= 0 for t in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"must be positive and increasing, got {value}")
        return value


EPSILON = 1e-3  # GPU-seconds: a job reaching a threshold at a float instant counts as past it


def level(thresholds: list[float], attained: float) -> int:
    return bisect.bisect_right(thresholds, attained + EPSILON)


@POLICIES.register("las", LasOptions)
class Las(Policy):
    """Tiresias' discretised 2D-LAS: fewest attained GPU-seconds first, by levels; preemptive."""

    preemptive = True
    options: LasOptions

    def __init__(self, options: LasOptions | None = None):
        super().__init__(options or LasOptions())

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        return (level(self.options.thresholds, job.attained_at(now)), job.submit)

    def next_change(self, job: Job, now: float) -> float | None:
        if job.run_start is None:
            return None
        thresholds = self.options.thresholds
        attained = job.attained_at(now)
        at = level(thresholds, attained)
        if at >= len(thresholds):
            return None
        return now + max(thresholds[at] - attained, EPSILON) / job.gpus

    def may_preempt(self, job: Job, victim: Job, now: float) -> bool:
        return job.key[0] < victim.key[0]

    def preempt_class(self, job: Job) -> Any:
        return job.key[0]  # its level: a job may preempt exactly the jobs of higher levels
