"""``int8``: 8-bit linear quantisation with one fp32 scale per bucket."""

from __future__ import annotations

import torch

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


@CODECS.register("int8", CodecOptions)
class Int8Codec(Codec):
    """Round g / (max|g| / 127) to int8; each worker's scale travels with its codes.

    Sums of int8 codes from many workers would overflow, so payloads are
    all-gathered and decoded one by one. Error per value <= scale / 2.
    """

    capabilities = Capabilities(summable=False, integer=True)

    def encode(self, tensor: torch.Tensor) -> Payload:
        scale = tensor.abs().max().clamp_min(1e-30) / 127
        codes = torch.round(tensor / scale).clamp_(-127, 127).to(torch.int8)
        return Payload([codes, scale.reshape(1).float()], {"dtype": tensor.dtype})

    def decode(self, payload: Payload) -> torch.Tensor:
        codes, scale = payload.tensors
        return (codes.float() * scale).to(payload.ctx["dtype"])
