"""The codec interface: a pure map tensor -> payload -> tensor.

A :class:`Payload` holds exactly the tensors that travel, so its
``wire_bytes`` is what the network carries. ``summable`` says whether payloads
from different workers may be all-reduced (their sum decodes to the sum of the
inputs) or must be all-gathered and decoded one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.registry import Component


@dataclass
class Payload:
    tensors: list[torch.Tensor]
    ctx: dict[str, Any] = field(default_factory=dict)  # local only, never sent

    @property
    def wire_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Codec:
    """Base of all codecs; subclasses set ``summable`` and implement the two maps."""

    summable: bool = True

    def encode(self, tensor: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_codec(component: Component) -> Codec:
    return component.target(component.options)
