"""Per-layer measurements that pipeline partitioning and planning start from.

A layer sequence, an ``nn.Sequential`` (nested ones flattened), is split at
its layers' boundaries (other models are cut through ``torch.export``:
:mod:`shoal.parallel.split_points`). Each layer is run on the output of
the one before, on a sample batch, forward then backward, a few times; its
median time, its parameters' bytes and its output's bytes are recorded.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map


@dataclass
class LayerProfile:
    index: int
    kind: str
    time_s: float  # forward + backward on the sample batch, median
    param_bytes: int
    activation_bytes: int  # the layer's output for the sample batch (what crosses a cut after it)
    matrices: tuple[tuple[int, int], ...] = ()  # its weight matrices (rows, cols), for PowerSGD's factor sizes

    def as_dict(self) -> dict:
        return asdict(self)


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in order, for models that are a plain sequence."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"layer-by-layer profiling needs a model that is a layer sequence (nn.Sequential); "
                         f"{type(model).__name__} is not")
    layers: list[nn.Module] = []
    for child in model:
        layers.extend(sequential_layers(child) if isinstance(child, nn.Sequential) else [child])
    return layers


def profile_layers(layers: list[nn.Module], sample: torch.Tensor, repeats: int = 5) -> list[LayerProfile]:
    """Measure each layer on ``sample`` (a batch of inputs), in order; running
    statistics and the random stream are left as they were."""
    profiles = []
    with kept_state(layers, sample):
        x = sample
        for index, layer in enumerate(layers):
            try:
                time_s, out = time_forward_backward(layer, (x,), repeats)
            finally:
                layer.zero_grad(set_to_none=True)
            profiles.append(LayerProfile(
                index=index,
                kind=type(layer).__name__,
                time_s=time_s,
                param_bytes=sum(p.numel() * p.element_size() for p in layer.parameters()),
                activation_bytes=out.numel() * out.element_size(),
                matrices=weight_matrices(layer.parameters()),
            ))
            x = out.detach()
    return profiles


def weight_matrices(params: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(rows, columns) of each parameter with two or more dimensions, as PowerSGD sees it."""
    return tuple((p.shape[0], p[0].numel()) for p in params if p.dim() >= 2)


def time_forward_backward(fn: Callable[..., Any], args: tuple, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn(*args)`` forward and backward, and the last run's output.

    1. Each run gets fresh leaf copies of the tensors in ``args`` (floating
       point ones requiring gradients), so runs do not chain through autograd.
    2. Backward starts from ones at every output tensor that requires a gradient.
    3. The first run warms up (allocations, kernels); the median of the next
       ``repeats`` (at least 1) is returned.
    """
    times, out = [], None
    for _ in range(max(1, repeats) + 1):
        inputs = tree_map(_leaf, args)
        _sync(inputs)
        started = time.perf_counter()
        out = fn(*inputs)
        grads = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if grads:
            torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
        _sync((inputs, out))  # GPU kernels run asynchronously: time them to their end
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), out


@contextmanager
def kept_state(modules: list[nn.Module], *inputs: torch.Tensor) -> Iterator[None]:
    """Whatever runs inside leaves the modules' buffers (running statistics) and the
    random streams as they were: the CPU one and that of every CUDA device the
    modules or ``inputs`` live on. Measuring must not train, and must not move
    one rank's random stream away from the others'."""
    tensors = [*inputs, *(t for module in modules for t in itertools.chain(module.parameters(), module.buffers()))]
    cuda_devices = sorted({t.device.index for t in tensors if t.is_cuda})
    buffers = [[b.clone() for b in module.buffers()] for module in modules]
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        try:
            yield
        finally:
            with torch.no_grad():
                for module, saved in zip(modules, buffers):
                    for b, kept in zip(module.buffers(), saved):
                        b.copy_(kept)


def model_costs(model: nn.Module, inputs: torch.Tensor, max_stages: int, repeats: int = 5,
                update_s_per_param: float = 0.0) -> tuple[list, list[str]]:
    """The cost model (:class:`shoal.parallel.plan.LayerCost`) of each piece a
    pipeline can cut ``model`` into, and the pieces' names.

    An ``nn.Sequential`` is cut between its layers; any other model at the
    ``torch.export`` split points the pipeline strategy would take for
    ``max_stages`` stages (:func:`shoal.parallel.split_points.profile_segments`).
    Each piece is profiled at two batch sizes, ``inputs`` and its first
    eighth, and its time fitted as fixed + per sample; the optimizer's step
    costs ``update_s_per_param`` per parameter.
    """
    from shoal.parallel.plan import LayerCost, fit_layer

    large = len(inputs)
    small = max(1, large // 8)
    if small == large:
        raise ValueError("profiling needs a batch of at least 2 samples")
    if isinstance(model, nn.Sequential):
        layers = sequential_layers(model)
        names = [f"{index}:{type(layer).__name__}" for index, layer in enumerate(layers)]
        big, little = profile_layers(layers, inputs, repeats), profile_layers(layers, inputs[:small], repeats)
    else:
        from shoal.parallel.split_points import profile_segments

        names, big = profile_segments(model, inputs, max_stages, repeats)
        small_names, little = profile_segments(model, inputs[:small], max_stages, repeats)
        if small_names != names:  # the cuts come from the graph, not the batch: a change is a bug
            raise RuntimeError(f"split points differ between batch {large} ({names}) and {small} ({small_names})")
    costs = []
    for p_big, p_small in zip(big, little):
        fixed, per_sample = fit_layer(p_small.time_s, small, p_big.time_s, large)
        costs.append(LayerCost(fixed_s=fixed, per_sample_s=per_sample, param_bytes=p_big.param_bytes,
                               activation_bytes_per_sample=p_big.activation_bytes / large,
                               matrices=p_big.matrices, update_s=update_s_per_param * p_big.param_bytes / 4))
    return costs, names


def update_seconds_per_parameter(model: nn.Module, make_optimizer, repeats: int = 3) -> float:
    """Median time of one optimizer step on ``model``'s parameters (random
    gradients), per parameter; the model is left as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = make_optimizer(params)
    times = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return statistics.median(times[1:]) / max(1, sum(p.numel() for p in params))


def _sync(values: Any) -> None:
    """Wait for the kernels queued on the CUDA devices of the tensors in ``values``."""
    for device in {t.device for t in tree_leaves(values) if isinstance(t, torch.Tensor) and t.is_cuda}:
        torch.cuda.synchronize(device)


def _leaf(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(value.is_floating_point())
