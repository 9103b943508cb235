"""The codec interface: a pure map tensor -> payload -> tensor.

A :class:`Payload` holds exactly the tensors that travel, so its
``wire_bytes`` is what the network carries. Shapes and dtypes of a payload
depend only on the input's size, never on its values, so every worker can
decode every other worker's payload with its own ``ctx``.

What a codec can do is declared once, on its class, as :class:`Capabilities`;
every user (the DDP hook, the parameter server, the pipeline's replicas, the
federation's config and server, ``codec: auto``, ``shoal bench codecs``, the
planner) reads it there and nowhere else decides by a codec's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from shoal.registry import CODECS, Component, load_builtins


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


@dataclass(frozen=True)
class Capabilities:
    """What a codec can do; declared on its class as ``capabilities``."""

    # Payloads from different workers may be summed (all-reduce): their sum
    # decodes to the sum of the inputs. Otherwise they are all-gathered and
    # decoded one by one.
    summable: bool
    # A receiver decodes one payload with nothing but its own codec: no random
    # stream shared with the sender, no extra rounds of messages. What a
    # parameter server's shard and a federated server need.
    standalone: bool = True
    # Collective rounds per exchange. A codec with more than one runs them
    # itself: it implements ``exchange(name, tensor, comm, shapes)`` instead of
    # one encode / collective / decode.
    rounds: int = 1
    # The payload's values are integers (levels, signs, fixed point) with at
    # most a few float scales beside them.
    integer: bool = False
    # Chooses a codec for each gradient bucket from measurements of the
    # cluster: for data parallel's DDP hook only.
    per_bucket: bool = False

    @property
    def multi_round(self) -> bool:
        return self.rounds > 1


class Codec:
    """Base of all codecs; subclasses declare ``capabilities`` and implement the two maps
    (or, with more than one round, ``exchange``)."""

    capabilities: ClassVar[Capabilities] = Capabilities(summable=True)
    # The options a codec outside shoal takes (``codec: package.module:MyCodec:opt=...``);
    # shoal's own are registered with theirs.
    Options: ClassVar[type[CodecOptions]] = CodecOptions

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


def codecs_that(need: str) -> list[str]:
    """The registered codecs whose capability ``need`` (a field of :class:`Capabilities`) holds."""
    load_builtins(CODECS)
    return [name for name in CODECS.names() if getattr(CODECS.target(name).capabilities, need)]
