"""``terngrad``: stochastic ternary gradients (Wen et al. 2017), 2 bits a value."""

from __future__ import annotations

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Codec, CodecOptions, Payload
from shoal.registry import CODECS


class TernGradOptions(CodecOptions):
    seed: int = Field(0, description="seed of this worker's rounding stream (offset by rank)")


@CODECS.register("terngrad", TernGradOptions)
class TernGradCodec(Codec):
    """Unbiased ternary quantisation.

    1. s = max|g|
    2. t_i = sign(g_i) with probability |g_i| / s, else 0  (so E[s t] = g)
    3. send t as 2-bit codes {0: 0, 1: +1, 2: -1} packed 4 per byte, and s
    """

    summable = False

    def __init__(self, options: TernGradOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        # Independent rounding on each worker, so the errors average out.
        self.generator = torch.Generator().manual_seed(options.seed * 1_000_003 + rank)

    def encode(self, tensor: torch.Tensor) -> Payload:
        scale = tensor.abs().max().clamp_min(1e-30)
        keep = torch.rand(tensor.shape, generator=self.generator) < (tensor.abs() / scale).cpu()
        codes = torch.where(keep.to(tensor.device), torch.where(tensor >= 0, 1, 2), 0).to(torch.uint8)
        return Payload(
            [bitpack.pack(codes, 2), scale.reshape(1).float()],
            {"numel": tensor.numel(), "dtype": tensor.dtype, "shape": tensor.shape},
        )

    def decode(self, payload: Payload) -> torch.Tensor:
        packed, scale = payload.tensors
        codes = bitpack.unpack(packed, 2, payload.ctx["numel"]).long()
        values = torch.tensor([0.0, 1.0, -1.0], device=packed.device)[codes]
        return (values * scale).to(payload.ctx["dtype"]).view(payload.ctx["shape"])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
