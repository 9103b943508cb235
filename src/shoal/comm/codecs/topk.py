"""``topk``: the k largest-magnitude values and their indices (Aji & Heafield
2017; with the sampled threshold of Deep Gradient Compression, Lin et al. 2018)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Codec, CodecOptions, Payload
from shoal.registry import CODECS


class TopkOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of values sent")
    sample: float = Field(0.0, ge=0, le=1, description="DGC threshold from this fraction of values; 0 = exact topk")
    seed: int = 0


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
    """Send k = ratio * n values (fp32) and their indices in the narrowest integer type."""

    summable = False

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
        ctx = {"numel": flat.numel(), "shape": tensor.shape}
        return Payload([flat[idx], idx.to(bitpack.index_dtype(flat.numel()))], ctx)

    def decode(self, payload: Payload) -> torch.Tensor:
        values, idx = payload.tensors
        out = values.new_zeros(payload.ctx["numel"])
        out.index_add_(0, idx.long(), values)
        return out.view(payload.ctx["shape"])
