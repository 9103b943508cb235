"""The identity codec: fp32 gradients as they are (plain all-reduce)."""

from __future__ import annotations

import torch

from shoal.comm.codecs.base import Codec, Payload
from shoal.registry import CODECS, NoOptions


@CODECS.register("none")
class NoCodec(Codec):
    """No compression: the gradient itself travels."""

    summable = True

    def __init__(self, options: NoOptions):
        self.options = options

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload([tensor])

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0]
