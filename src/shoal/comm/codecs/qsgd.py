"""``qsgd``: stochastic quantisation to s levels (Alistarh et al. 2017)."""

from __future__ import annotations

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload, bucket_scales, per_value
from shoal.registry import CODECS


class QsgdOptions(CodecOptions):
    levels: int = Field(7, ge=1, le=127, description="s: quantisation levels per sign")
    bucket: int = Field(0, ge=0, description="values per norm (the paper's d, e.g. 512); 0: one norm for the "
                        "whole tensor")
    seed: int = 0


@CODECS.register("qsgd", QsgdOptions)
class QsgdCodec(Codec):
    """Unbiased s-level quantisation of g / ||g||_2, bucket by bucket.

    1. cut g into buckets of d consecutive values (``bucket``; 0: d = n, one
       bucket), each with its norm ||g_B||
    2. r_i = s |g_i| / ||g_B||; l_i = floor(r_i) + Bernoulli(r_i - floor(r_i))
    3. send each bucket's norm (fp32) and each value's sign and level: packed
       into 2 bits when s = 1, 4 bits when s <= 7 (1 sign bit + 3 level
       bits), else one byte
    4. decode: ||g_B|| sign_i l_i / s
    Variance bound: E||Q(g) - g||^2 <= min(d/s^2, sqrt(d)/s) ||g||^2, so
    small buckets tame the noise a single norm of a large tensor brings, at
    32 / d bits a value for the norms. Norms differ between workers, hence
    all-gather.
    """

    capabilities = Capabilities(summable=False, integer=True)

    def __init__(self, options: QsgdOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.levels = options.levels
        self.bucket = options.bucket
        self.bits = 2 if options.levels == 1 else 4 if options.levels <= 7 else 8
        self.generator = torch.Generator().manual_seed(options.seed * 1_000_003 + rank)

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.reshape(-1).float()
        norms = bucket_scales(flat, self.bucket, "norm")
        ratio = flat.abs() / per_value(norms, self.bucket, flat.numel()) * self.levels
        lower = ratio.floor()
        level = lower + (torch.rand(flat.shape, generator=self.generator).to(flat.device) < ratio - lower)
        sign = (flat < 0).to(torch.uint8)
        codes = (sign << (self.bits - 1)) | level.to(torch.uint8)
        ctx = {"numel": flat.numel(), "dtype": tensor.dtype, "shape": tensor.shape}
        return Payload([bitpack.pack(codes, self.bits), norms], ctx)

    def decode(self, payload: Payload) -> torch.Tensor:
        packed, norms = payload.tensors
        numel = payload.ctx["numel"]
        codes = bitpack.unpack(packed, self.bits, numel).to(torch.int32)
        sign = 1 - 2 * (codes >> (self.bits - 1))
        level = codes & ((1 << (self.bits - 1)) - 1)
        out = per_value(norms, self.bucket, numel) * (sign * level).float() / self.levels
        return out.to(payload.ctx["dtype"]).view(payload.ctx["shape"])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
