"""``qsgd``: stochastic quantisation to s levels (Alistarh et al. 2017)."""

from __future__ import annotations

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Codec, CodecOptions, Payload
from shoal.registry import CODECS


class QsgdOptions(CodecOptions):
    levels: int = Field(7, ge=1, le=127, description="s: quantisation levels per sign")
    seed: int = 0


@CODECS.register("qsgd", QsgdOptions)
class QsgdCodec(Codec):
    """Unbiased s-level quantisation of g / ||g||_2.

    1. r_i = s |g_i| / ||g||; l_i = floor(r_i) + Bernoulli(r_i - floor(r_i))
    2. send ||g||, sign and level of each value: packed into 4 bits when
       s <= 7 (1 sign bit + 3 level bits), else one byte
    3. decode: ||g|| sign_i l_i / s
    Variance bound: E||Q(g) - g||^2 <= min(n/s^2, sqrt(n)/s) ||g||^2.
    """

    summable = False

    def __init__(self, options: QsgdOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.levels = options.levels
        self.bits = 4 if options.levels <= 7 else 8
        self.generator = torch.Generator().manual_seed(options.seed * 1_000_003 + rank)

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.reshape(-1).float()
        norm = flat.norm().clamp_min(1e-30)
        ratio = flat.abs() / norm * self.levels
        lower = ratio.floor()
        level = lower + (torch.rand(flat.shape, generator=self.generator).to(flat.device) < ratio - lower)
        sign = (flat < 0).to(torch.uint8)
        codes = (sign << (self.bits - 1)) | level.to(torch.uint8)
        ctx = {"numel": flat.numel(), "dtype": tensor.dtype, "shape": tensor.shape}
        return Payload([bitpack.pack(codes, self.bits), norm.reshape(1)], ctx)

    def decode(self, payload: Payload) -> torch.Tensor:
        packed, norm = payload.tensors
        codes = bitpack.unpack(packed, self.bits, payload.ctx["numel"]).to(torch.int32)
        sign = 1 - 2 * (codes >> (self.bits - 1))
        level = codes & ((1 << (self.bits - 1)) - 1)
        out = norm * (sign * level).float() / self.levels
        return out.to(payload.ctx["dtype"]).view(payload.ctx["shape"])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
