"""``codec: auto``: measure this job's link and step, predict each codec's time
to target with the alpha-beta model, choose the fastest.

At the first step, on every worker:

1. compute: a few forward+backward passes on the first batch with no
   communication (model buffers and random streams restored afterwards, so
   the probe leaves no trace but its time)
2. codecs: encode+decode of that gradient with each candidate, timed; its
   wire bytes read from the payload
3. link: two timed all-reduces (a few bytes and ``probe_mb``) fitted to
   ``shoal.netem.costmodel.fit_allreduce``
4. the slowest worker's figures (an all-reduce of MAX) decide, so every
   worker computes the same prediction and picks the same codec

Predicted time to target = steps factor x (compute + (codec + comm) / period).
The steps factor is what compression costs in convergence: 1 for the exact
codecs, a prior (``topk_steps``, ``int8_steps``) for the lossy ones. The model
assumes no overlap of communication with backward, which overstates the cost
of ``none`` a little on fast links, where fp16 and none run at the same speed.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from shoal.comm.codecs.auto import AutoOptions
from shoal.comm.codecs.base import build_codec
from shoal.comm.hooks import LocalComm
from shoal.metrics.probe import kept_state
from shoal.netem import costmodel
from shoal.registry import CODECS, Component


@dataclass
class AutoChoice:
    """What was measured and predicted, and the codec chosen."""

    codec: str
    workers: int
    compute_s: float
    link_mbit_per_s: float
    link_alpha_ms: float
    gradient_bytes: int
    predictions: list[dict[str, Any]]
    probe_s: float

    def reason(self) -> str:
        rows = sorted(self.predictions, key=lambda p: p["time_factor"])
        first = rows[0]
        lines = [
            f"codec auto: link {self.link_mbit_per_s:,.0f} Mbit/s, latency {self.link_alpha_ms:.2f} ms, "
            f"compute {self.compute_s * 1e3:.1f} ms/step, gradient {self.gradient_bytes / 1e6:.2f} MB, "
            f"{self.workers} workers (probe {self.probe_s:.2f} s)"
        ]
        for p in rows:
            lines.append(
                f"  {p['spec']:<40} step {p['step_s'] * 1e3:8.1f} ms (codec {p['codec_s'] * 1e3:.1f}, "
                f"comm {p['comm_s'] * 1e3:.1f}) x {p['step_factor']:.2f} steps -> "
                f"{p['time_factor'] / first['time_factor']:.2f}x"
            )
        lines.append(f"  chose {self.codec}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_specs(options: AutoOptions) -> list[tuple[str, float]]:
    """(codec spec, steps factor) for each candidate."""
    ef = ",memory=ef" if options.memory == "ef" else ""
    table = {
        "none": ("none", 1.0),
        "fp16": ("fp16", 1.0),
        "bf16": ("bf16", 1.0),
        "int8": (f"int8:memory={options.memory}", options.int8_steps),
        "topk": (f"topk:ratio={options.topk_ratio},sample=0.01{ef}", options.topk_steps),
        "powersgd": (f"powersgd:rank={options.powersgd_rank}{ef}", options.powersgd_steps),
    }
    return [table[name] for name in dict.fromkeys(options.candidates)]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocations, first-call paths
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _probe_compute(model: nn.Module, loss_fn, inputs, targets, repeats: int) -> tuple[float, torch.Tensor]:
    """Median forward+backward time and the flat gradient, leaving the model as it was."""
    params = [p for p in model.parameters() if p.requires_grad]

    def once() -> None:
        for p in params:
            p.grad = None
        loss_fn(model(inputs), targets).backward()

    try:
        with kept_state([model], inputs):
            compute_s = _median_time(once, repeats)
            grad = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).detach().clone()
    finally:
        for p in params:
            p.grad = None
    return compute_s, grad


def _probe_codec(
    spec: str, grad: torch.Tensor, shapes: list[torch.Size], workers: int, rank: int, repeats: int
) -> tuple[float, int, bool]:
    """Seconds of encode + decode(s) for one step's gradient, wire bytes, summable."""
    codec = build_codec(CODECS.resolve(spec), rank=rank)
    if spec == "none":
        return 0.0, grad.numel() * grad.element_size(), True
    if codec.capabilities.multi_round:  # its own all-reduce rounds: time them on one worker
        comm = LocalComm()
        codec.exchange(0, grad.clone(), comm, shapes=shapes)
        seconds = _median_time(lambda: codec.exchange(0, grad.clone(), LocalComm(), shapes=shapes), repeats)
        return seconds, comm.sent, True
    payload = codec.encode(grad)
    decodes = 1 if codec.capabilities.summable else workers  # an all-gather decodes every worker's payload

    def once() -> None:
        p = codec.encode(grad)
        for _ in range(decodes):
            codec.decode(p)

    return _median_time(once, repeats), payload.wire_bytes, codec.capabilities.summable


def _probe_link(group, nbytes: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of a tiny and of an ``nbytes`` all-reduce."""
    results = []
    for size, n in ((64, 3 * repeats), (nbytes, repeats)):  # the tiny one is cheap and noisier
        buf = torch.zeros(max(size // 4, 1), dtype=torch.float32, device=device)
        dist.all_reduce(buf, group=group)  # warm-up: connections, buffers
        times = []
        for _ in range(n):
            dist.barrier(group=group)  # start together: time the collective, not the wait
            started = time.perf_counter()
            dist.all_reduce(buf, group=group)
            times.append(time.perf_counter() - started)
        results.append(statistics.median(times))
    return results[0], results[1]


def choose_codec(
    model: nn.Module,
    loss_fn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    options: AutoOptions,
    *,
    group=None,
    rank: int = 0,
    period: int = 1,
    bucket_cap_mb: float = 25.0,
) -> tuple[Component, AutoChoice]:
    """Probe, predict and choose; a collective call (every worker, same order)."""
    started = time.perf_counter()
    workers = dist.get_world_size(group) if dist.is_initialized() else 1
    compute_s, grad = _probe_compute(model, loss_fn, inputs, targets, options.probe_steps)
    specs = candidate_specs(options)
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    probes = [_probe_codec(spec, grad, shapes, workers, rank, repeats=3) for spec, _ in specs]
    probe_bytes = int(options.probe_mb * 2**20)
    if workers > 1:
        small_s, large_s = _probe_link(group, probe_bytes, repeats=3, device=grad.device)
        # The slowest worker sets a synchronous step's pace: decide on its figures.
        measured = torch.tensor([compute_s, small_s, large_s, *(p[0] for p in probes)], dtype=torch.float64)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX, group=group)
        compute_s, small_s, large_s, *codec_times = measured.tolist()
        link = costmodel.fit_allreduce(64, small_s, probe_bytes, large_s, workers)
    else:
        codec_times = [p[0] for p in probes]
        link = costmodel.Link(alpha_s=0.0, beta_bytes_per_s=math.inf)
    gradient_bytes = grad.numel() * grad.element_size()
    buckets = max(1, math.ceil(gradient_bytes / (bucket_cap_mb * 2**20)))
    costs = []
    for (spec, steps), (_, wire, summable), codec_s in zip(specs, probes, codec_times):
        rounds = 3 if spec.startswith("powersgd") else 1  # plain part, P, Q
        comm = costmodel.comm_s(wire, summable, workers, link, buckets * rounds)
        costs.append(costmodel.CodecCost(spec, compute_s, codec_s, comm, steps, period))
    chosen = costmodel.best(costs)
    choice = AutoChoice(
        codec=chosen.name,
        workers=workers,
        compute_s=compute_s,
        link_mbit_per_s=link.mbit_per_s,
        link_alpha_ms=link.alpha_s * 1e3,
        gradient_bytes=gradient_bytes,
        predictions=[
            {"spec": c.name, "step_s": c.step_s, "codec_s": c.codec_s, "comm_s": c.comm_s,
             "step_factor": c.step_factor, "time_factor": c.time_factor}
            for c in costs
        ],
        probe_s=time.perf_counter() - started,
    )
    return CODECS.resolve(chosen.name), choice
