"""``terngrad``: stochastic ternary gradients (Wen et al. 2017), 2 bits a value."""

from __future__ import annotations

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload, bucket_scales, per_value
from shoal.registry import CODECS


class TernGradOptions(CodecOptions):
    bucket: int = Field(0, ge=0, description="values per scale (e.g. 512); 0: one scale for the whole tensor")
    seed: int = Field(0, description="seed of this worker's rounding stream (offset by rank)")


@CODECS.register("terngrad", TernGradOptions)
class TernGradCodec(Codec):
    """Unbiased ternary quantisation, bucket by bucket.

    1. cut g into buckets of ``bucket`` consecutive values (0: one bucket),
       each with its scale s_B = max|g_B| (the paper's per-layer scalar, at a
       finer grain)
    2. t_i = sign(g_i) with probability |g_i| / s_B, else 0  (so E[s_B t] = g)
    3. send t as 2-bit codes {0: 0, 1: +1, 2: -1} packed 4 per byte, and each
       s_B as fp32 (32 / bucket bits a value)
    A value's variance is |g_i| (s_B - |g_i|): one scale for a whole model
    change lets its largest value set the noise of every coordinate, a
    bucket's scale only that of its neighbours. Scales differ between
    workers, hence all-gather.
    """

    capabilities = Capabilities(summable=False, integer=True)

    def __init__(self, options: TernGradOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.bucket = options.bucket
        # Independent rounding on each worker, so the errors average out.
        self.generator = torch.Generator().manual_seed(options.seed * 1_000_003 + rank)

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.reshape(-1)
        scales = bucket_scales(flat, self.bucket, "max")
        probability = flat.abs().float() / per_value(scales, self.bucket, flat.numel())
        keep = torch.rand(flat.shape, generator=self.generator) < probability.cpu()
        codes = torch.where(keep.to(flat.device), torch.where(flat >= 0, 1, 2), 0).to(torch.uint8)
        return Payload(
            [bitpack.pack(codes, 2), scales],
            {"numel": flat.numel(), "dtype": tensor.dtype, "shape": tensor.shape},
        )

    def decode(self, payload: Payload) -> torch.Tensor:
        packed, scales = payload.tensors
        numel = payload.ctx["numel"]
        codes = bitpack.unpack(packed, 2, numel).long()
        values = torch.tensor([0.0, 1.0, -1.0], device=packed.device)[codes]
        return (values * per_value(scales, self.bucket, numel)).to(payload.ctx["dtype"]).view(payload.ctx["shape"])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
