"""Per-layer measurements that pipeline partitioning and planning start from.

A layer sequence, an ``nn.Sequential`` (nested ones flattened), is split at
its layers' boundaries (other models are cut through ``torch.export``:
:mod:`shoal.parallel.split_points`). Each layer is run on the output of
the one before, on a sample batch, forward then backward, a few times; its
median time, its parameters' bytes and its output's bytes are recorded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from shoal.metrics.probe import kept_state


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
