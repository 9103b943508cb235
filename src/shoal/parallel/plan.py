"""Predicting the step time and memory of data-parallel, pipeline and hybrid
layouts from measured layer profiles and the alpha-beta link model (pure
arithmetic once the profile is taken).

Compute: each layer's forward+backward time is measured at two batch sizes
and fitted as ``t(b) = fixed + per_sample * b`` (small microbatches pay the
fixed part every time, which is why very fine pipelines disappoint); the
optimizer's step is timed on the whole model and shared out per parameter.
Communication: ring all-reduce ``2(N-1)/N * S/B + 2(N-1) alpha`` for data
parallel gradients (:mod:`shoal.netem.costmodel`), one message per stage
boundary and microbatch each way for pipelines. Pipeline step time: ``(M + P
- 1)`` microbatch slots of the slowest stage (its compute plus its sends),
so the idle share is the bubble ``(P-1)/(M+P-1)``. Every layout is compared
on the same global batch: N workers x the config's per-worker batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shoal.netem.costmodel import Link, allgather_s, allreduce_s
from shoal.parallel.partition import NoFeasibleSplit, min_max_split


@dataclass(frozen=True)
class LayerCost:
    fixed_s: float  # per call, whatever the batch
    per_sample_s: float
    param_bytes: int
    activation_bytes_per_sample: float
    matrices: tuple[tuple[int, int], ...] = ()  # weight matrices (rows, cols), for PowerSGD's factor sizes
    update_s: float = 0.0  # the optimizer's step on this layer's parameters

    def time_s(self, batch: float) -> float:
        return max(self.fixed_s + self.per_sample_s * batch, 0.0)


def fit_layer(t_small: float, b_small: int, t_large: float, b_large: int) -> tuple[float, float]:
    """``(fixed, per_sample)`` through two timings (never negative)."""
    per_sample = max((t_large - t_small) / (b_large - b_small), 0.0)
    return max(t_small - per_sample * b_small, 0.0), per_sample


@dataclass(frozen=True)
class CodecModel:
    """What a codec sends for ``numel`` gradient values."""

    name: str  # a codec spec
    messages: int = 1

    @property
    def summable(self) -> bool:
        """All-reduced or all-gathered: as the codec's class declares it."""
        from shoal.registry import CODECS, load_builtins

        load_builtins(CODECS)
        return CODECS.resolve(self.name).target.capabilities.summable

    def wire_bytes(self, layers: list[LayerCost]) -> float:
        params = sum(layer.param_bytes for layer in layers) / 4  # fp32 values
        if self.name == "fp16":
            return 2 * params
        if self.name.startswith("topk"):
            return max(1.0, 0.01 * params) * 8  # value + 32-bit index
        if self.name.startswith("powersgd"):
            rank = 4
            in_matrices = sum(r * c for layer in layers for r, c in layer.matrices)
            factors = sum(rank * (r + c) for layer in layers for r, c in layer.matrices)
            return 4 * (params - in_matrices + factors)
        return 4 * params


CODECS = [CodecModel("none"), CodecModel("fp16"), CodecModel("powersgd:rank=4", messages=3),
          CodecModel("topk:ratio=0.01")]


@dataclass
class Layout:
    label: str
    kind: str  # data, pipeline, hybrid
    workers: int
    stages: int = 1
    replicas: int = 1
    microbatches: int = 1
    codec: str = "none"
    step_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    bubble_fraction: float = 0.0
    memory_bytes: float = 0.0
    wire_bytes: float = 0.0  # per worker per step
    fits: bool = True
    partition: list[list[int]] = field(default_factory=list)
    virtual: int = 1  # chunks per rank (interleaved schedule)

    def as_dict(self) -> dict:
        return asdict(self)


def moments_per_parameter(optimizer: str, momentum: float = 0.0) -> int:
    """Tensors of state an optimizer keeps per parameter: Adam(W) 2, SGD with momentum 1, plain SGD 0."""
    if optimizer.lower() in ("adam", "adamw"):
        return 2
    return 1 if momentum else 0


def memory_factor(optimizer_states: int) -> int:
    return 2 + optimizer_states  # parameters, gradients, optimizer moments


def in_flight(schedule: str, microbatches: int, stages: int, virtual: int = 1) -> int:
    """Microbatches whose activations a stage holds at once: all under GPipe, at most P under 1F1B.

    Interleaved 1F1B (V chunks per rank, PyTorch's ScheduleInterleaved1F1B):
    rank 0 runs (V-1) * R + 2(P-1) forward chunks before its first backward
    and holds one more in its steady state, R = M // max(1, M // P) being the
    microbatches per round, at most V*M in all. Its forwards go round by
    round, each round R microbatches through chunk 0, then R through chunk
    1, ...; the count here is the most any one chunk holds among them (the
    first chunk's), so a stage's memory is not under-counted."""
    if schedule == "gpipe":
        return microbatches
    if schedule != "interleaved" or virtual <= 1:
        return min(microbatches, stages)
    per_round = microbatches // max(1, microbatches // stages)
    peak = min(virtual * microbatches, (virtual - 1) * per_round + 2 * (stages - 1) + 1)
    held = [0] * virtual
    for op in range(peak):
        held[(op // per_round) % virtual] += 1
    return max(held)


def layer_memory(param_bytes: float, activation_bytes: float, held: int, optimizer_states: int) -> float:
    """A layer's share of a stage's memory: parameters, gradients, moments, and ``held`` microbatches' outputs."""
    return param_bytes * memory_factor(optimizer_states) + activation_bytes * held


def data_parallel(layers: list[LayerCost], workers: int, batch: int, link: Link, codec: CodecModel,
                  optimizer_states: int, cap: float | None) -> Layout:
    compute = sum(layer.time_s(batch) + layer.update_s for layer in layers)
    wire = codec.wire_bytes(layers)
    comm = (allreduce_s if codec.summable else allgather_s)(wire, workers, link, codec.messages)
    memory = sum(layer.param_bytes for layer in layers) * memory_factor(optimizer_states) \
        + sum(layer.activation_bytes_per_sample for layer in layers) * batch
    return Layout(label=f"data x{workers} {codec.name}", kind="data", workers=workers, replicas=workers,
                  codec=codec.name, step_s=compute + comm, compute_s=compute, comm_s=comm, memory_bytes=memory,
                  wire_bytes=wire if workers > 1 else 0.0, fits=cap is None or memory <= cap)


def pipeline(layers: list[LayerCost], stages: int, replicas: int, microbatches: int, global_batch: int, link: Link,
             optimizer_states: int, cap: float | None, schedule: str = "1f1b",
             bounds: list[range] | None = None, virtual: int = 1) -> Layout:
    """``stages`` x ``replicas`` workers; each replica runs global_batch / replicas in M microbatches,
    on the balanced partition unless ``bounds`` gives one.

    Under ``schedule="interleaved"`` the layers are cut into P*V chunks and
    rank r holds chunks r, r+P, ...: a microbatch's trip through one chunk is
    the slot, a step (V*M + P - 1) slots, the bubble (P-1)/(V*M+P-1), and
    every chunk boundary is a send (V times a plain pipeline's)."""
    V = virtual if schedule == "interleaved" else 1
    chunks = stages * V
    micro = global_batch / (replicas * microbatches)
    times = [layer.time_s(micro) for layer in layers]
    held = in_flight(schedule, microbatches, stages, V)
    sizes = [layer_memory(layer.param_bytes, layer.activation_bytes_per_sample * micro, held, optimizer_states)
             for layer in layers]
    fits = True
    if bounds is None:  # the balanced partition, under the cap as partition=auto takes it
        try:
            bounds = min_max_split(times, chunks, sizes=sizes if cap else None, cap=cap / V if cap else None)
        except NoFeasibleSplit:
            bounds, fits = min_max_split(times, chunks), False
    slot, wire = 0.0, [0.0] * stages
    memory, params, update = [0.0] * stages, [0.0] * stages, [0.0] * stages
    for c, part in enumerate(bounds):
        rank = c % stages
        compute = sum(times[i] for i in part)
        cut_out = layers[part[-1]].activation_bytes_per_sample * micro if c < chunks - 1 else 0.0
        cut_in = layers[part[0] - 1].activation_bytes_per_sample * micro if c > 0 else 0.0
        sends = (link.alpha_s + cut_out / link.beta_bytes_per_s if cut_out else 0.0) \
            + (link.alpha_s + cut_in / link.beta_bytes_per_s if cut_in else 0.0)  # activations out, grads back
        slot = max(slot, compute + sends)
        memory[rank] += sum(sizes[i] for i in part)
        wire[rank] += (cut_out + cut_in) * microbatches
        params[rank] += sum(layers[i].param_bytes for i in part)
        update[rank] += sum(layers[i].update_s for i in part)  # after the flush, not overlapped
    dp_comm = allreduce_s(max(params), replicas, link)
    step = (V * microbatches + stages - 1) * slot + dp_comm + max(update)
    compute = sum(times) / stages * microbatches + max(update)
    kind = "pipeline" if replicas == 1 else "hybrid"
    label = f"pipeline P={stages} M={microbatches}" + (f" V={V}" if V > 1 else "") \
        + (f" x dp {replicas}" if replicas > 1 else "")
    return Layout(label=label, kind=kind, workers=stages * replicas, stages=stages, replicas=replicas,
                  microbatches=microbatches, step_s=step, compute_s=compute, comm_s=step - compute,
                  bubble_fraction=(stages - 1) / (V * microbatches + stages - 1), memory_bytes=max(memory),
                  wire_bytes=max(wire) + (max(params) if replicas > 1 else 0.0),
                  fits=fits and (cap is None or max(memory) <= cap),
                  partition=[[r.start, r.stop] for r in bounds], virtual=V)


def candidates(layers: list[LayerCost], workers: int, batch: int, link: Link, optimizer_states: int,
               cap: float | None, microbatches: tuple[int, ...] = (4, 8, 16, 32)) -> list[Layout]:
    """Every layout of ``workers`` workers worth predicting, fastest first."""
    out = [data_parallel(layers, workers, batch, link, codec, optimizer_states, cap) for codec in CODECS]
    global_batch = workers * batch
    for stages in range(2, min(workers, len(layers)) + 1):
        if workers % stages:
            continue
        replicas = workers // stages
        for m in microbatches:
            if global_batch % (replicas * m):
                continue
            out.append(pipeline(layers, stages, replicas, m, global_batch, link, optimizer_states, cap))
            # Interleaved 1F1B with two chunks per rank, where the model has the pieces
            # and M is a multiple of P (PyTorch's schedule runs microbatches in rounds of P).
            if 2 * stages <= len(layers) and m % stages == 0:
                out.append(pipeline(layers, stages, replicas, m, global_batch, link, optimizer_states, cap,
                                    "interleaved", virtual=2))
    return sorted(out, key=lambda layout: (not layout.fits, layout.step_s))


def recommend(layouts: list[Layout]) -> tuple[Layout | None, str]:
    """The fastest layout that fits, and why."""
    fitting = [layout for layout in layouts if layout.fits]
    if not fitting:
        smallest = min(layouts, key=lambda layout: layout.memory_bytes)
        return None, (f"nothing fits the memory cap; the smallest footprint is {smallest.label} "
                      f"at {smallest.memory_bytes / 2**20:,.1f} MiB per worker")
    best = fitting[0]
    reason = f"fastest predicted step ({best.step_s * 1e3:,.2f} ms) among layouts that fit"
    if best.codec.startswith(("topk", "powersgd")):
        reason += " (a lossy codec: it may need more steps to the same accuracy; `shoal bench comm` measures that)"
    if len(fitting) > 1:
        reason += f", {fitting[1].step_s / best.step_s:,.2f}x ahead of {fitting[1].label}"
    unfit = [layout for layout in layouts if not layout.fits and layout.step_s < best.step_s]
    if unfit:
        reason += f"; {unfit[0].label} would be faster but needs {unfit[0].memory_bytes / 2**20:,.1f} MiB"
    return best, reason


def parse_bytes(text: str) -> float:
    """``16GiB``, ``512MB``, ``1e9`` -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
             "b": 1}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)]
            break
    else:
        number, scale = lowered, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r}: expected a size such as 16GiB or 512MB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: must be a positive size")
    return value


def parse_seconds(text: str) -> float:
    """``50us``, ``1ms``, ``0.2s`` -> seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            try:
                value = float(lowered[: -len(unit)]) * scale
            except ValueError:
                break
            if value >= 0:
                return value
    raise ValueError(f"{text!r}: expected a latency such as 50us or 1ms")
