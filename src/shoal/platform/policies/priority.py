"""Strict priority classes with preemption: a job of a higher class preempts running jobs of lower
classes (never of its own); within a class, submission order."""

from __future__ import annotations

from typing import Any

from shoal.platform.policies.base import Job, Policy, PolicyOptions
from shoal.registry import POLICIES


@POLICIES.register("priority", PolicyOptions)
class Priority(Policy):
    """Higher priority first and preempting lower classes; submission order within a class."""

    preemptive = True

    def key(self, job: Job, now: float) -> tuple[Any, ...]:
        return (-job.priority, job.submit)

    def may_preempt(self, job: Job, victim: Job, now: float) -> bool:
        return job.priority > victim.priority

    def preempt_class(self, job: Job) -> Any:
        return job.priority
