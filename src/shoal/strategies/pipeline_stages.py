"""Building a ``pipeline`` run's stages: choosing the partition, cutting the
model into PyTorch pipeline stages, timing them, and the schedule over them.

1. :func:`choose_partition` (rank 0) profiles the layers, or an exported
   model's segments, and takes the contiguous split that minimises the
   slowest stage under the memory cap (or the equal split).
2. :func:`sequential_stages` / :func:`exported_stages` build this rank's
   ``PipelineStage`` objects and name every stage's tensors.
3. :func:`time_chunks` makes a stage report its compute to a
   :class:`~shoal.strategies.pipeline_meter.PipelineMeter`;
   :func:`boundary_bytes` is what a rank's stages send per microbatch.
4. :func:`build_schedule` runs the stages under PyTorch's schedule.

``torch.distributed.pipelining`` (and :mod:`shoal.parallel.split_points`,
which needs it) is imported inside these functions: it takes most of a
second, which every worker of every other strategy would pay, as
``load_builtins`` imports this module with the strategies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shoal.parallel.partition import NoFeasibleSplit, equal_split, min_max_split
from shoal.parallel.plan import in_flight, layer_memory, moments_per_parameter
from shoal.parallel.profile import LayerProfile, profile_layers

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from shoal.strategies.pipeline import PipelineOptions
    from shoal.strategies.pipeline_meter import PipelineMeter

# PyTorch's schedule classes by option name.
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}

# A stage's parameters and buffers, in the order its module holds them.
StageTensors = tuple[list[torch.Tensor], list[torch.Tensor]]


def choose_partition(model: nn.Module, layers: list[nn.Module] | None, sample: torch.Tensor,
                     options: PipelineOptions, optimizer: torch.optim.Optimizer, *,
                     virtual: int) -> tuple[list[tuple[int, int]], list[dict], list[str] | None]:
    """Profile the layers (or, ``layers=None``, the exported model's segments)
    on ``sample``, one microbatch on the device, and choose the
    ``options.stages * virtual`` stages: their bounds, the profiles and the
    segments' names (None for layers)."""
    stages, repeats = options.stages * virtual, options.profile_repeats
    names = None
    if layers is not None:
        profiles = profile_layers(layers, sample, repeats)
    else:
        from shoal.parallel.split_points import profile_segments

        names, profiles = profile_segments(model, sample, stages, repeats)
    if options.partition == "equal":
        bounds = equal_split(len(profiles), stages)
    else:
        cap = options.max_memory_per_worker
        cap = cap / virtual if cap else cap  # a rank holds V stages: each gets its share
        held = in_flight(options.schedule, options.microbatches, options.stages, virtual)
        moments = moments_per_parameter(type(optimizer).__name__, optimizer.defaults.get("momentum", 0.0))
        sizes = [layer_memory(p.param_bytes, p.activation_bytes, held, moments) for p in profiles]
        try:
            bounds = min_max_split([p.time_s for p in profiles], stages,
                                   sizes=sizes if cap else None, cap=float(cap) if cap else None)
        except NoFeasibleSplit as err:
            raise ValueError(f"pipeline: max_memory_per_worker="
                             f"{options.max_memory_per_worker.human_readable()}: {err}") from None
    return [(r.start, r.stop) for r in bounds], [p.as_dict() for p in profiles], names


def sequential_stages(layers: list[nn.Module], bounds: Sequence[range], stages: int, local: Sequence[int], *,
                      device: torch.device, group: dist.ProcessGroup) -> tuple[list[StageTensors], list[PipelineStage]]:
    """A layer sequence cut between its layers: every stage's tensors, and this rank's stages built."""
    from torch.distributed import pipelining

    modules = [nn.Sequential(*(layers[i] for i in part)) for part in bounds]
    held = [([*m.parameters()], [*m.buffers()]) for m in modules]
    built = [pipelining.PipelineStage(modules[index], index, stages, device, group=group) for index in local]
    return held, built


def exported_stages(model: nn.Module, sample: torch.Tensor, split_points: list[str], stages: int,
                    local: Sequence[int], *, device: torch.device,
                    group: dist.ProcessGroup) -> tuple[list[StageTensors], list[PipelineStage]]:
    """Any other model through ``torch.export``, cut before ``split_points``.
    Every rank traces the whole model (same graph everywhere) and keeps its own stages."""
    from shoal.parallel.split_points import export_pipe, stage_tensors

    pipe = export_pipe(model, sample, split_points)
    held = [stage_tensors(model, pipe.get_stage_module(s)) for s in range(stages)]
    built = [pipe.build_stage(index, device, group=group) for index in local]
    return held, built


def time_chunks(stage: PipelineStage, meter: PipelineMeter) -> None:
    """Count this stage's compute and the microbatches it holds activations for."""
    def timed(method, delta: int):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                meter.chunk(time.perf_counter() - started, delta)
        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk, +1)
    stage.backward_one_chunk = timed(stage.backward_one_chunk, -1)


def boundary_bytes(local: Sequence[int], bounds: Sequence[range], profiles: Sequence[LayerProfile],
                   stages: int) -> tuple[int, int]:
    """Per microbatch, what this rank's stages send: (activations to the next
    stages, their gradients back to the previous)."""
    out_bytes, in_bytes = 0, 0
    for index in local:
        part = bounds[index]
        if index < stages - 1:
            out_bytes += profiles[part[-1]].activation_bytes
        if index > 0:
            in_bytes += profiles[part[0] - 1].activation_bytes
    return out_bytes, in_bytes


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int, loss_fn: Callable) -> Any:
    """PyTorch's schedule ``name`` over this rank's stages (one, except interleaved)."""
    from torch.distributed import pipelining

    schedule = getattr(pipelining, SCHEDULES[name])
    return schedule(stages if name == "interleaved" else stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
