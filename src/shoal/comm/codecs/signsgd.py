"""``signsgd``: one bit a value plus one scale (Bernstein et al. 2018; with
error feedback, EF-SignSGD of Karimireddy et al. 2019)."""

from __future__ import annotations

import torch

from shoal.comm import bitpack
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


@CODECS.register("signsgd", CodecOptions)
class SignCodec(Codec):
    """sign(g) packed 8 per byte, scaled by mean|g| so the update keeps g's l1 size.

    1. scale = mean(|g|)
    2. send bits b_i = [g_i >= 0] and the scale
    3. decode: scale * (2 b - 1)
    """

    capabilities = Capabilities(summable=False, integer=True)

    def encode(self, tensor: torch.Tensor) -> Payload:
        scale = tensor.abs().mean().reshape(1).float()
        bits = bitpack.pack((tensor >= 0).to(torch.uint8), 1)
        return Payload([bits, scale], {"numel": tensor.numel(), "dtype": tensor.dtype, "shape": tensor.shape})

    def decode(self, payload: Payload) -> torch.Tensor:
        bits, scale = payload.tensors
        signs = bitpack.unpack(bits, 1, payload.ctx["numel"]).float() * 2 - 1
        return (signs * scale).to(payload.ctx["dtype"]).view(payload.ctx["shape"])
