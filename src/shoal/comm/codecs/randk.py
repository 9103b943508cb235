"""``randk``: k values at positions drawn from a seed every worker shares
(Stich et al. 2018), so no indices travel and payloads can be all-reduced."""

from __future__ import annotations

import torch
from pydantic import Field

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


class RandkOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1)
    seed: int = Field(0, description="shared by all workers: the positions must agree")


@CODECS.register("randk", RandkOptions)
class RandkCodec(Codec):
    """Same random k positions on every worker each call (drawn with replacement); only the values are sent.

    Decoding scatters without rescaling (a biased estimate); use it with
    ``memory=ef`` so the values not sent are carried to later steps.
    """

    # Indices come from a random stream shared with the sender.
    capabilities = Capabilities(summable=True, standalone=False)

    def __init__(self, options: RandkOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        # Not offset by rank: every worker must draw the same positions.
        self.generator = torch.Generator().manual_seed(options.seed)

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.reshape(-1)
        k = max(1, int(round(self.options.ratio * flat.numel())))
        # Drawn with replacement: a full permutation of n would cost O(n) per call.
        # A repeated position carries the same value twice and decodes the same.
        idx = torch.randint(0, flat.numel(), (k,), generator=self.generator).to(flat.device)
        return Payload([flat[idx]], {"idx": idx, "numel": flat.numel(), "shape": tensor.shape})

    def decode(self, payload: Payload) -> torch.Tensor:
        out = payload.tensors[0].new_zeros(payload.ctx["numel"])
        out[payload.ctx["idx"]] = payload.tensors[0]
        return out.view(payload.ctx["shape"])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
