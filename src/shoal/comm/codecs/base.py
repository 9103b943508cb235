"""The codec interface: a pure map tensor -> payload -> tensor.

A :class:`Payload` holds exactly the tensors that travel, so its
``wire_bytes`` is what the network carries. ``summable`` says whether payloads
from different workers may be all-reduced (their sum decodes to the sum of the
inputs) or must be all-gathered and decoded one by one. Shapes and dtypes of a
payload depend only on the input's size, never on its values, so every worker
can decode every other worker's payload with its own ``ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from shoal.registry import Component


class CodecOptions(BaseModel):
    """Options every codec takes."""

    model_config = ConfigDict(extra="forbid")
    memory: Literal["none", "ef"] = "none"


@dataclass
class Payload:
    tensors: list[torch.Tensor]
    ctx: dict[str, Any] = field(default_factory=dict)  # local only, never sent

    @property
    def wire_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to_bytes(self) -> torch.Tensor:
        """All tensors as one flat uint8 buffer: one collective instead of several."""
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in self.tensors])

    def from_bytes(self, buffer: torch.Tensor) -> "Payload":
        """Another worker's payload of the same layout, read from its bytes."""
        tensors, offset = [], 0
        for t in self.tensors:
            n = t.numel() * t.element_size()
            chunk = buffer[offset : offset + n]
            if chunk.storage_offset() % t.element_size():
                chunk = chunk.clone()  # a view across dtypes needs aligned storage
            tensors.append(chunk.view(t.dtype).view(t.shape))
            offset += n
        return Payload(tensors, self.ctx)


class Codec:
    """Base of all codecs; subclasses set ``summable`` and implement the two maps."""

    summable: bool = True
    # Whether a receiver can decode a payload with nothing but its own codec
    # (no random stream shared with the sender, no extra rounds of messages):
    # what a federated server needs to decode a client's update.
    standalone: bool = True

    def __init__(self, options: CodecOptions, *, rank: int = 0):
        self.options = options
        self.rank = rank  # for per-worker random streams; shared ones ignore it

    def encode(self, tensor: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def bucket_size(bucket: int, numel: int) -> int:
    """Values per scale: ``bucket``, or all of them when it is 0 or at least ``numel``."""
    return bucket if 0 < bucket < numel else max(numel, 1)


def bucket_scales(flat: torch.Tensor, bucket: int, reduce: Literal["max", "norm"]) -> torch.Tensor:
    """One fp32 scale per run of ``bucket`` consecutive values (0: one for all).

    ``reduce``: the run's largest magnitude or its l2 norm. The last run may be
    short; it is padded with zeros, which change neither.
    """
    size = bucket_size(bucket, flat.numel())
    rows = torch.nn.functional.pad(flat.float(), (0, (-flat.numel()) % size)).view(-1, size)
    scales = rows.abs().amax(dim=1) if reduce == "max" else rows.norm(dim=1)
    return scales.clamp_min(1e-30)


def per_value(scales: torch.Tensor, bucket: int, numel: int) -> torch.Tensor:
    """Each value's scale, from :func:`bucket_scales`' output."""
    return scales.repeat_interleave(bucket_size(bucket, numel))[:numel]


def build_codec(component: Component, *, rank: int = 0) -> Codec:
    return component.target(component.options, rank=rank)
