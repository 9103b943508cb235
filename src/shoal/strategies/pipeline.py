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

The stages are built in :mod:`shoal.strategies.pipeline_stages`; the meter
and the summary maths are in :mod:`shoal.strategies.pipeline_meter`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator
from torch import nn

from shoal.comm import layout
from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import CodecHookState, exchange, packed_entries
from shoal.comm.wire import WireMeter
from shoal.parallel.profile import LayerProfile, sequential_layers
from shoal.registry import STRATEGIES
from shoal.strategies.base import StepStats, Strategy
from shoal.strategies.pipeline_meter import PipelineMeter, memory_in_use, peak_memory_bytes, pipeline_figures
from shoal.strategies.pipeline_stages import (
    boundary_bytes,
    build_schedule,
    choose_partition,
    exported_stages,
    sequential_stages,
    time_chunks,
)


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
        if len(inputs) % self.M:
            raise ValueError(f"pipeline: microbatches={self.M} must divide the batch of {len(inputs)}")
        microbatch, device = inputs[: len(inputs) // self.M], self.context.device
        plan: list[Any] = [None]
        if self.context.rank == 0:  # rank 0 profiles and chooses the stages; everyone gets the answer
            plan[0] = self._saved_plan or choose_partition(self.model, self.layers, microbatch.to(device),
                                                           self.options, self.optimizer, virtual=self.V)
        dist.broadcast_object_list(plan, src=0)
        bounds, profiles, self.segments = plan[0]
        self.bounds = [range(a, b) for a, b in bounds]
        self.profiles = [LayerProfile(**p) for p in profiles]
        if self.layers is not None:
            held, built = sequential_stages(self.layers, self.bounds, self.S, self.local,
                                            device=device, group=self.pp_group)
        else:
            held, built = exported_stages(self.model, microbatch.to(device), self._split_points(), self.S,
                                          self.local, device=device, group=self.pp_group)
        self.stage_tensors = [[*params, *buffers] for params, buffers in held]
        self.stage_params = [p for index in self.local for p in held[index][0] if p.requires_grad]
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        own = {id(p) for index in self.local for p in held[index][0]}
        self.others = {id(p): (p, p.shape) for index in range(self.S) if index not in self.local
                       for p in held[index][0] if id(p) not in own}
        for stage in built:
            time_chunks(stage, self.stage_meter)
        self.out_bytes, self.in_bytes = boundary_bytes(self.local, self.bounds, self.profiles, self.S)
        self.schedule = build_schedule(self.options.schedule, built, self.M, self.loss_fn)
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
