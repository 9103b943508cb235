"""What a ``pipeline`` run measures, and the pure maths of its summary.

:class:`PipelineMeter` counts one rank's compute, schedule time, activations
held and sent, and memory; :func:`pipeline_figures` combines every rank's
:meth:`PipelineMeter.figures` into the summary fields (no process group:
testable on plain dicts). :func:`memory_in_use` and :func:`peak_memory_bytes`
read this process's memory, CUDA or CPU.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shoal.parallel.partition import imbalance
from shoal.parallel.profile import LayerProfile

@dataclass
class PipelineMeter:
    """What one rank's stages did, over all steps: compute, schedule time,
    activations held and sent, memory. :meth:`figures` is its share of the summary."""

    busy_s: float = 0.0  # forward/backward compute
    pipeline_s: float = 0.0  # the schedules' wall time
    first_busy_s: float = 0.0  # of them, the first step's
    first_pipeline_s: float = 0.0
    steps: int = 0
    in_flight: int = 0  # microbatch chunks whose activations are held now
    peak_in_flight: int = 0
    activation_bytes: int = 0  # sent to the neighbouring stages
    peak_step_memory: int = 0  # memory in use at the end of a step, the most of any step
    held_bytes: int = 0  # parameter storage while training, the most of any step

    def chunk(self, seconds: float, held: int) -> None:
        """A stage ran one chunk's forward (``held=+1``: its activations are kept) or backward (-1)."""
        self.busy_s += seconds
        self.in_flight += held
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def step(self, *, pipeline_s: float, activation_bytes: int, memory_bytes: int, held_bytes: int) -> None:
        """A step ended: the schedule ran ``pipeline_s``, sent ``activation_bytes``; memory in use after it."""
        self.pipeline_s += pipeline_s
        if self.steps == 0:  # the first step also connects the stages' send/recv pairs: not the steady state
            self.first_busy_s, self.first_pipeline_s = self.busy_s, self.pipeline_s
        self.activation_bytes += activation_bytes
        self.steps += 1
        self.peak_step_memory = max(self.peak_step_memory, memory_bytes)
        self.held_bytes = max(self.held_bytes, held_bytes)

    def figures(self) -> dict[str, Any]:
        """This rank's means per step, idle share and peaks (what :func:`pipeline_figures` combines)."""
        steps = max(self.steps, 1)
        return {
            "busy_s": self.busy_s / steps,
            "pipeline_s": self.pipeline_s / steps,
            # The idle share in the steady state: past the first step where there are more.
            "idle": _idle(self.busy_s - self.first_busy_s, self.pipeline_s - self.first_pipeline_s)
            if self.steps > 1 else _idle(self.busy_s, self.pipeline_s),
            "peak_in_flight": self.peak_in_flight,
            "training_memory_bytes": self.peak_step_memory,
            "held_parameter_bytes": self.held_bytes,
            "activation_bytes": self.activation_bytes,
        }


def pipeline_figures(ranks: Sequence[dict[str, Any]], *, stages: int, virtual: int, microbatches: int,
                     bounds: Sequence[range], profiles: Sequence[LayerProfile],
                     model_parameter_bytes: int) -> dict[str, Any]:
    """The pipeline's summary fields from every rank's :meth:`PipelineMeter.figures`
    (in rank order, each with its ``peak_memory_bytes``): per-stage figures from
    replica 0 (the first ``stages`` ranks; rank r holds stages r, r+P, ...),
    memory as the most of any rank, activations sent as the mean of all."""
    first = ranks[:stages]  # replica 0
    busy = [w["busy_s"] for w in first]
    bubble = [w["idle"] for w in first]
    stage_act = [sum(profiles[i].activation_bytes for k in range(virtual) for i in bounds[r + k * stages])
                 for r in range(stages)] if profiles else [0] * stages  # per rank
    return {
        "stage_compute_s": busy,
        "stage_imbalance": max(busy) / (sum(busy) / len(busy)) if sum(busy) > 0 else None,
        "predicted_stage_imbalance": imbalance([p.time_s for p in profiles], bounds) if profiles else None,
        "bubble_fraction": sum(bubble) / len(bubble),
        "bubble_fraction_theory": (stages - 1) / (virtual * microbatches + stages - 1),
        "peak_memory_bytes": max(w["peak_memory_bytes"] for w in ranks),
        "training_memory_bytes": max(w["training_memory_bytes"] for w in ranks),
        "held_parameter_bytes": max(w["held_parameter_bytes"] for w in ranks),
        "model_parameter_bytes": model_parameter_bytes,
        "peak_activation_bytes": max(w["peak_in_flight"] * a / virtual for w, a in zip(first, stage_act)),
        "stage_peak_in_flight": [w["peak_in_flight"] for w in first],  # chunk activations held, per rank
        "activation_bytes_per_worker": sum(w["activation_bytes"] for w in ranks) / len(ranks),
    }


def _idle(busy_s: float, pipeline_s: float) -> float:
    return 1 - busy_s / pipeline_s if pipeline_s > 0 else 0.0


def memory_in_use(device: torch.device) -> int:
    """Bytes this process holds now: CUDA memory allocated, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # no /proc: the peak so far is the best there is
        return peak_memory_bytes(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
