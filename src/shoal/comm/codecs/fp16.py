"""Half-precision codecs: ``fp16`` and ``bf16`` (2 bytes a value, summable)."""

from __future__ import annotations

import torch

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


class _HalfCodec(Codec):
    capabilities = Capabilities(summable=True)
    dtype: torch.dtype

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload([tensor.to(self.dtype)], {"dtype": tensor.dtype})

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.tensors[0].to(payload.ctx["dtype"])


@CODECS.register("fp16", CodecOptions)
class Fp16Codec(_HalfCodec):
    """IEEE half precision: 2 bytes a value, summed in fp16 (range +-65504)."""

    dtype = torch.float16


@CODECS.register("bf16", CodecOptions)
class Bf16Codec(_HalfCodec):
    """bfloat16: fp32's range with 8 bits of mantissa, 2 bytes a value."""

    dtype = torch.bfloat16
