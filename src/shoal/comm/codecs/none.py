"""The identity codec: fp32 gradients as they are (plain all-reduce)."""

from __future__ import annotations

import torch

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


@CODECS.register("none", CodecOptions)
class NoCodec(Codec):
    """No compression: the gradient itself travels."""

    capabilities = Capabilities(summable=True)

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload([tensor])

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0]
