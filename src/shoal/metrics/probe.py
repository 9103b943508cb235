"""Measuring without side effects: whatever a probe runs leaves the model's
running statistics and every random stream as they were."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
