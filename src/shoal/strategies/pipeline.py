"""``pipeline``: pipeline (model) parallelism on ``torch.distributed.pipelining``,
with an automatic balanced partition and optional data parallel replicas.

The model is cut into P contiguous stages, one per rank of a pipeline: an
``nn.Sequential`` (nested ones flattened) between its layers, any other model
through ``torch.export``, before submodules that its forward calls
(:mod:`shoal.parallel.split_points`; the model must trace as one graph).
Each step's batch is split into M microbatches that flow through the stages
under PyTorch's GPipe or 1F1B schedule (PyTorch does the schedules, the
stages and the send/recv). ``schedule=interleaved`` cuts P*V stages and gives
rank r the stages r, r+P, r+2P, ... (PyTorch's interleaved 1F1B, Narayanan et
al. 2021), which shrinks the bubble to (P-1)/(V*M+P-1) for V times the sends.
``dp=D`` runs D such pipelines on P*D ranks, rank = replica*P + stage, each
replica on its own share of the data; after the backward pass each stage's
gradients are averaged over the D replicas of that stage through the codec.

Partition (``partition=auto``): rank 0 times every layer's (exported models:
every segment's) forward+backward on the first microbatch, with its
parameter and output bytes (:mod:`shoal.parallel.profile`), then takes the
contiguous split that minimises the slowest stage
(:func:`shoal.parallel.partition.min_max_split`), under
``max_memory_per_worker`` when given: a stage's estimate is its parameters,
gradients and optimizer state plus its outputs for the microbatches in
flight (M under GPipe, P under 1F1B). ``partition=equal`` is the naive
same-number-of-layers (or segments) split, for comparison.

Every rank builds the whole model object (its stage's layers, or the
parameters and buffers of its exported stage, are the model's own objects),
then, once the stages are built, releases the storage of every parameter
outside its own stages: while it trains, a rank holds its stages'
parameters, gradients and optimizer state only. Before an evaluation or
checkpoint the released parameters are allocated again and each stage's
parameters broadcast from replica 0, so evaluation runs data parallel on the
whole model; the next step releases them again.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator
from torch import nn

from shoal.comm import layout
from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import CodecHookState, exchange, packed_entries
from shoal.comm.wire import WireMeter
from shoal.parallel.partition import NoFeasibleSplit, equal_split, imbalance, min_max_split
from shoal.parallel.plan import in_flight, layer_memory, moments_per_parameter
from shoal.parallel.profile import LayerProfile, profile_layers, sequential_layers
from shoal.registry import STRATEGIES
from shoal.strategies.base import StepStats, Strategy

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# PyTorch's schedule classes by option name. torch.distributed.pipelining (and
# split_points, which needs it) is imported when a pipeline is built: it takes
# most of a second, which every worker of every other strategy would pay.
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


class PipelineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: int = Field(2, ge=2, le=64, description="P: pipeline stages (ranks per pipeline)")
    microbatches: int = Field(4, ge=1, le=1024, description="M: microbatches per step (must divide the batch)")
    schedule: Literal["gpipe", "1f1b", "interleaved"] = Field(
        "1f1b", description="PyTorch's schedule; interleaved: 1F1B over `virtual` stages per rank")
    virtual: int = Field(2, ge=1, le=16, description="stages per rank under schedule=interleaved (looped placement)")
    partition: Literal["auto", "equal"] = Field("auto", description="auto: balance measured layer times; "
                                                "equal: the same number of layers per stage")
    dp: int = Field(1, ge=1, le=1024, description="D: data-parallel replicas of the pipeline (P*D workers)")
    max_memory_per_worker: ByteSize | None = Field(None, description="cap on a stage's estimated memory, "
                                                   "e.g. 64MiB (auto partition)")
    profile_repeats: int = Field(5, ge=1, description="timed runs per layer when profiling")

    @model_validator(mode="after")
    def _rounds(self) -> "PipelineOptions":
        rounds = max(1, self.microbatches // self.stages)  # PyTorch's interleaved schedule runs M in whole rounds
        if self.schedule == "interleaved" and self.microbatches % rounds:
            raise ValueError(f"schedule=interleaved runs microbatches in rounds of about stages={self.stages}: "
                             f"microbatches={self.microbatches} must be a multiple of {rounds}")
        return self

    def check_job(self, world_size: int, batch_size: int) -> None:
        """What the config alone shows to be impossible, before any process starts."""
        if self.stages * self.dp != world_size:
            raise ValueError(f"pipeline: stages={self.stages} x dp={self.dp} needs {self.stages * self.dp} "
                             f"workers; the job has {world_size}")
        if batch_size % self.microbatches:
            raise ValueError(f"pipeline: microbatches={self.microbatches} must divide the batch of {batch_size} "
                             f"(data.batch_size)")


@STRATEGIES.register("pipeline", PipelineOptions)
class PipelineStrategy(Strategy):
    """Pipeline parallel (GPipe / 1F1B) with a balanced partition; ``dp`` replicas."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)
        o, ctx = self.options, self.context
        self.P, self.D, self.M = o.stages, o.dp, o.microbatches
        if ctx.world_size != self.P * self.D:
            raise ValueError(f"pipeline: stages={self.P} x dp={self.D} needs {self.P * self.D} workers; "
                             f"the job has {ctx.world_size}")
        if self.codec_spec.target.capabilities.per_bucket:
            raise ValueError(f"pipeline: codec {self.codec_spec.name} chooses per gradient bucket of data parallel; "
                             "name a codec for the replicas' gradient average (e.g. none, fp16)")
        self.V = o.virtual if o.schedule == "interleaved" else 1  # stages per rank
        self.S = self.P * self.V  # stages in all
        # A layer sequence is cut between its layers; any other model through torch.export, at its first step.
        self.layers = sequential_layers(model) if isinstance(model, nn.Sequential) else None
        if self.layers is not None and len(self.layers) < self.S:
            raise ValueError(f"pipeline: {self.S} stages ({self.P} ranks x {self.V}) but the model has only "
                             f"{len(self.layers)} layers")
        self.stage_index, self.replica = ctx.rank % self.P, ctx.rank // self.P
        self.local = [self.stage_index + k * self.P for k in range(self.V)]  # this rank's stages (looped)
        # Every rank creates every group (a collective call), then keeps its own.
        pp = [dist.new_group([r * self.P + s for s in range(self.P)]) for r in range(self.D)]
        dp = [dist.new_group([r * self.P + s for r in range(self.D)]) for s in range(self.P)]
        self.pp_group, self.dp_group = pp[self.replica], dp[self.stage_index]
        self.meter = WireMeter()
        self.dp_state = CodecHookState(build_codec(self.codec_spec, rank=ctx.rank), self.meter, self.dp_group) \
            if self.D > 1 else None
        self.schedule: Any = None  # built at the first step, once a batch shows the shapes
        self._saved_plan: Any = None  # a resumed run keeps its partition (optimizer state follows the layers)
        self.bounds: list[range] = []
        self.profiles: list[LayerProfile] = []
        self.segments: list[str] | None = None  # exported models, once planned: the submodule each segment begins at
        self.stage_tensors: list[list[torch.Tensor]] = []  # every stage's parameters and buffers
        self.others: dict[int, tuple[torch.Tensor, torch.Size]] = {}  # parameters outside this rank's stages
        self.released = False
        self.model_bytes = 0
        self.stage_meter = PipelineMeter()

    # --- set-up -----------------------------------------------------------
    def data_shard(self) -> tuple[int, int]:
        return self.context.rank // self.options.stages, self.options.dp

    def _setup(self, inputs: torch.Tensor) -> None:
        from torch.distributed import pipelining

        from shoal.parallel.split_points import export_pipe, stage_tensors

        if len(inputs) % self.M:
            raise ValueError(f"pipeline: microbatches={self.M} must divide the batch of {len(inputs)}")
        microbatch = inputs[: len(inputs) // self.M]
        plan: list[Any] = [None]
        if self.context.rank == 0:
            plan[0] = self._saved_plan or self._partition(microbatch)
        dist.broadcast_object_list(plan, src=0)
        bounds, profiles, self.segments = plan[0]
        self.bounds = [range(a, b) for a, b in bounds]
        self.profiles = [LayerProfile(**p) for p in profiles]
        if self.layers is not None:
            modules = [nn.Sequential(*(self.layers[i] for i in part)) for part in self.bounds]
            held = [([*m.parameters()], [*m.buffers()]) for m in modules]
            built = [pipelining.PipelineStage(modules[index], index, self.S, self.context.device, group=self.pp_group)
                     for index in self.local]
        else:
            # Every rank traces the whole model (same graph everywhere) and keeps its own stages.
            pipe = export_pipe(self.model, microbatch.to(self.context.device), self._split_points())
            held = [stage_tensors(self.model, pipe.get_stage_module(s)) for s in range(self.S)]
            built = [pipe.build_stage(index, self.context.device, group=self.pp_group) for index in self.local]
        self.stage_tensors = [[*params, *buffers] for params, buffers in held]
        self.stage_params = [p for index in self.local for p in held[index][0] if p.requires_grad]
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        own = {id(p) for index in self.local for p in held[index][0]}
        self.others = {id(p): (p, p.shape) for index in range(self.S) if index not in self.local
                       for p in held[index][0] if id(p) not in own}
        stages, self.out_bytes, self.in_bytes = [], 0, 0
        for index, stage in zip(self.local, built):
            part = self.bounds[index]
            self._time(stage)
            stages.append(stage)
            if index < self.S - 1:
                self.out_bytes += self.profiles[part[-1]].activation_bytes  # per microbatch, to the next stage
            if index > 0:
                self.in_bytes += self.profiles[part[0] - 1].activation_bytes  # gradients back to the previous
        schedule = getattr(pipelining, SCHEDULES[self.options.schedule])
        self.schedule = schedule(stages if self.options.schedule == "interleaved" else stages[0],
                                 n_microbatches=self.M, loss_fn=self.loss_fn)
        self._release()

    def _release(self) -> None:
        """Free the storage of the parameters outside this rank's stages."""
        for p, _ in self.others.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.released = True

    def _materialise(self) -> None:
        """Give the released parameters storage of their shape again (values follow by broadcast)."""
        for p, shape in self.others.values():
            p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        self.released = False

    def _split_points(self) -> list[str]:
        """Exported models: the submodule each stage after the first begins at (none before the first step)."""
        segments = self.segments or []
        return [segments[part.start] for part in self.bounds[1:]]

    def _partition(self, microbatch: torch.Tensor) -> tuple[list[tuple[int, int]], list[dict], list[str] | None]:
        """Rank 0: profile the layers (or an exported model's segments) and
        choose the stages (everyone gets the answer)."""
        sample, repeats = microbatch.to(self.context.device), self.options.profile_repeats
        names = None
        if self.layers is not None:
            profiles = profile_layers(self.layers, sample, repeats)
        else:
            from shoal.parallel.split_points import profile_segments

            names, profiles = profile_segments(self.model, sample, self.S, repeats)
        if self.options.partition == "equal":
            bounds = equal_split(len(profiles), self.S)
        else:
            cap = self.options.max_memory_per_worker
            cap = cap / self.V if cap else cap  # a rank holds V stages: each gets its share
            held = in_flight(self.options.schedule, self.M, self.P, self.V)
            moments = moments_per_parameter(type(self.optimizer).__name__, self.optimizer.defaults.get("momentum", 0.0))
            sizes = [layer_memory(p.param_bytes, p.activation_bytes, held, moments) for p in profiles]
            try:
                bounds = min_max_split([p.time_s for p in profiles], self.S,
                                       sizes=sizes if cap else None, cap=float(cap) if cap else None)
            except NoFeasibleSplit as err:
                raise ValueError(f"pipeline: max_memory_per_worker="
                                 f"{self.options.max_memory_per_worker.human_readable()}: {err}") from None
        return [(r.start, r.stop) for r in bounds], [p.as_dict() for p in profiles], names

    def _time(self, stage: PipelineStage) -> None:
        """Count this stage's compute and the microbatches it holds activations for."""
        def timed(method, delta: int):
            def run(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.stage_meter.chunk(time.perf_counter() - started, delta)
            return run

        stage.forward_one_chunk = timed(stage.forward_one_chunk, +1)
        stage.backward_one_chunk = timed(stage.backward_one_chunk, -1)

    # --- a step -------------------------------------------------------------
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        if self.schedule is None:
            self._setup(inputs)
        elif not self.released:  # an evaluation or checkpoint gave them back
            self._release()
        started = time.perf_counter()
        busy_before = self.stage_meter.busy_s
        self.optimizer.zero_grad(set_to_none=True)
        first, last = self.stage_index == 0, self.stage_index == self.P - 1
        losses: list[torch.Tensor] = []
        if first:
            self.schedule.step(inputs)
        elif last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        pipeline_s = time.perf_counter() - started
        sent = self.out_bytes + self.in_bytes  # activations forward, their gradients back
        if self.dp_state is not None:
            self._average_gradients()
        self.optimizer.step()
        memory = memory_in_use(self.context.device)
        held = sum(p.numel() * p.element_size() for p in self.model.parameters())  # what really has storage
        self.stage_meter.step(pipeline_s=pipeline_s, activation_bytes=sent * self.M, memory_bytes=memory,
                              held_bytes=held)
        busy_s = self.stage_meter.busy_s - busy_before
        loss = torch.tensor([torch.stack(losses).mean().item() if last else 0.0], device=self.context.device)
        dist.all_reduce(loss, group=self.pp_group)  # the last stage's loss, for rank 0's log
        wire = self.meter.take()
        return StepStats(
            loss=loss.item(), compute_s=busy_s, comm_s=time.perf_counter() - started - busy_s,
            wire_bytes=sent * self.M + wire.wire_bytes, dense_bytes=sent * self.M + wire.dense_bytes,
            samples=len(targets) if last else 0,  # each sample counted once, by the stage that finishes it
        )

    @torch.no_grad()
    def _average_gradients(self) -> None:
        flat = layout.flatten([p.grad for p in self.stage_params], like=self.stage_params)
        keep = self._kept_entries(flat.numel())
        if keep is None:
            mean = exchange(self.dp_state, self.stage_index, flat, shapes=[p.shape for p in self.stage_params])
        else:  # sparse training: the replicas exchange the kept weights' gradients only
            mean = torch.zeros_like(flat)
            if keep.numel():
                mean[keep] = exchange(self.dp_state, self.stage_index, flat[keep], dense_numel=flat.numel())
        layout.as_grads(self.stage_params, mean)

    def use_masks(self, masks: Any) -> None:
        """Sparse training: the weights are ranked over the whole model, so every
        rank gets every stage's parameters back first (released again at the
        next step); pruned weights are zeroed where they are held, and the
        replicas of a stage (``dp``) average the kept weights' gradients only."""
        if self.dp_state is not None:
            self.dp_state.masks = masks

    def before_ranking(self) -> None:
        self.prepare_eval()

    def _kept_entries(self, numel: int) -> torch.Tensor | None:
        """Indices of this rank's flat gradient whose weights are kept (None: all;
        multi-round codecs get the dense gradient, their matrices whole)."""
        if self.dp_state.codec.capabilities.multi_round:
            return None
        return packed_entries(self.dp_state, self.stage_index, self.stage_params, numel)

    # --- evaluation, checkpoints, summary -------------------------------------
    @torch.no_grad()
    def prepare_eval(self) -> None:
        """Every rank gets every stage's current parameters (from replica 0)."""
        if self.schedule is None:
            return  # nothing trained yet: every rank holds the same initial model
        if self.released:
            self._materialise()
        for stage, params in enumerate(self.stage_tensors):  # stage s lives on replica 0's rank s % P
            if not params:
                continue
            flat = layout.flatten(params, dtype=torch.float32)  # one dtype for the broadcast (buffers: ints too)
            dist.broadcast(flat, src=stage % self.P)
            layout.copy_into(params, flat)  # back to each tensor's own dtype

    def state_dict(self) -> dict[str, Any]:
        plan = ([(r.start, r.stop) for r in self.bounds], [p.as_dict() for p in self.profiles], self.segments) \
            if self.bounds else None
        return {"optimizer": self.optimizer.state_dict(), "plan": plan}  # each rank's own stages' moments

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        plan = state.get("plan")
        if plan and len(plan[0]) == self.S:
            if len(plan) == 2:  # older checkpoints' plans (layer sequences only) name no segments
                plan = (*plan, None)
            self._saved_plan = plan

    def close(self) -> dict[str, Any]:
        """Per-stage compute, bubble, memory and partition figures, gathered on every rank."""
        mine = {**self.stage_meter.figures(), "peak_memory_bytes": peak_memory_bytes(self.context.device)}
        everyone: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(everyone, mine)
        return {
            "partition": [[r.start, r.stop] for r in self.bounds],
            **({"split_points": self._split_points()} if self.layers is None else {}),
            **pipeline_figures(everyone, stages=self.P, virtual=self.V, microbatches=self.M, bounds=self.bounds,
                               profiles=self.profiles, model_parameter_bytes=self.model_bytes),
        }


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
