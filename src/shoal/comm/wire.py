"""Metering what a worker hands to the process group.

Bytes are counted from the tensors passed to each collective, never estimated
from the model size. Communication time is the union of the intervals during
which at least one collective was in flight (hand-off to completion), so
concurrent buckets are not double counted; it includes any part that overlapped
backward compute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch


@dataclass
class WireStats:
    wire_bytes: int = 0
    dense_bytes: int = 0
    comm_s: float = 0.0
    collectives: int = 0


class WireMeter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        self.total = WireStats()

    def _reset(self) -> None:
        self._step = WireStats()
        self._intervals: list[tuple[float, float]] = []

    def sent(self, tensors: list[torch.Tensor], dense_numel: int) -> float:
        """Record tensors handed to one collective; returns its start time."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            self._step.wire_bytes += nbytes
            self._step.dense_bytes += dense_numel * 4
            self._step.collectives += 1
        return time.perf_counter()

    def done(self, started: float) -> None:
        with self._lock:
            self._intervals.append((started, time.perf_counter()))

    def take(self) -> WireStats:
        """Close the step: return its stats and add them to the run total."""
        with self._lock:
            step = self._step
            step.comm_s = _union_length(self._intervals)
            self._reset()
        t = self.total
        t.wire_bytes += step.wire_bytes
        t.dense_bytes += step.dense_bytes
        t.comm_s += step.comm_s
        t.collectives += step.collectives
        return step


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total
