"""``topk``: the k largest-magnitude values and their indices (Aji & Heafield
2017; with the sampled threshold of Deep Gradient Compression, Lin et al. 2018)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS


class TopkOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of values sent")
    sample: float = Field(0.0, ge=0, le=1, description="DGC threshold from this fraction of values; 0 = exact topk")
    values: Literal["fp32", "fp16"] = Field("fp32", description="precision of the values sent")
    positions: Literal["index", "bitmap"] = Field(
        "index", description="index: an integer per value sent (int16 or int32); bitmap: one bit per value of the "
        "tensor, fewer bytes once ratio exceeds 1/16 (int16 indices) or 1/32 (int32)")
    seed: int = 0


_FP16_MAX = torch.finfo(torch.float16).max


def topk_select(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |values| (exact)."""
    return flat.abs().topk(k, sorted=False).indices


def sampled_topk_select(flat: torch.Tensor, k: int, sample: float, generator: torch.Generator) -> torch.Tensor:
    """DGC's cheaper selection: estimate the k-th largest |value| on a random sample.

    1. draw m = sample * n random positions; take the (1.3 k m / n)-th largest
       |value| there as threshold, 30% low so that one pass almost always
       yields at least k candidates
    2. candidates = positions at or above the threshold (one pass, no sort of n values)
    3. exactly k: the top k among the candidates; with too few, lower the
       threshold once more (2x the sample rank), then fall back to exact topk
    """
    n = flat.numel()
    mags = flat.abs()
    m = max(int(n * sample), 1)
    sampled = mags[torch.randint(0, n, (m,), generator=generator).to(flat.device)]
    for slack in (1.3, 2.6):
        rank = min(max(int(math.ceil(slack * k * m / n)), 1), m)
        threshold = sampled.topk(rank, sorted=False).values.min()
        candidates = (mags >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= k:
            return candidates[mags[candidates].topk(k, sorted=False).indices]
    return topk_select(flat, k)


@CODECS.register("topk", TopkOptions)
class TopkCodec(Codec):
    """Send the k = ratio * n largest-magnitude values and where they are.

    1. pick the k positions (exact, or DGC's sampled threshold)
    2. values: fp32, or fp16 (saturated to fp16's range; with error feedback
       the rounding error is carried to the next round like the rest)
    3. positions: indices in the narrowest integer type, or a bitmap of n bits
       with the values in position order. k depends on n alone, so the
       payload's layout does too; a bitmap whose count is not k is refused.
    """

    capabilities = Capabilities(summable=False)

    def __init__(self, options: TopkOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.generator = torch.Generator().manual_seed(options.seed * 1_000_003 + rank)

    def encode(self, tensor: torch.Tensor) -> Payload:
        flat = tensor.reshape(-1)
        k = max(1, int(round(self.options.ratio * flat.numel())))
        if self.options.sample > 0 and k < flat.numel():
            idx = sampled_topk_select(flat, k, self.options.sample, self.generator)
        else:
            idx = topk_select(flat, k)
        ctx = {"numel": flat.numel(), "shape": tensor.shape, "dtype": tensor.dtype}
        if self.options.positions == "bitmap":
            idx = idx.sort().values
            marked = torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device).index_fill_(0, idx, 1)
            positions = bitpack.pack(marked, 1)
        else:
            positions = idx.to(bitpack.index_dtype(flat.numel()))
        values = flat[idx]
        if self.options.values == "fp16":
            values = values.float().clamp(-_FP16_MAX, _FP16_MAX).half()
        return Payload([values, positions], ctx)

    def decode(self, payload: Payload) -> torch.Tensor:
        values, positions = payload.tensors
        numel = payload.ctx["numel"]
        if self.options.positions == "bitmap":
            idx = bitpack.unpack(positions, 1, numel).nonzero().squeeze(1)
            if idx.numel() != values.numel():
                raise ValueError(f"topk: the bitmap marks {idx.numel()} positions for {values.numel()} values")
        else:
            idx = positions.long()
        out = torch.zeros(numel, dtype=payload.ctx["dtype"], device=values.device)
        out.index_add_(0, idx, values.to(out.dtype))
        return out.view(payload.ctx["shape"])
