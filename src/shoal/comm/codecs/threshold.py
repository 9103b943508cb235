"""``threshold``: send every value whose magnitude reaches a fixed threshold
(Strom 2015), with its index. How many go out varies by step and worker."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from shoal.comm import bitpack
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions
from shoal.registry import CODECS


class ThresholdOptions(CodecOptions):
    tau: float = Field(0.01, gt=0, description="send values with |g| >= tau")


@CODECS.register("threshold", ThresholdOptions)
class ThresholdCodec(Codec):
    """Values at or above ``tau`` in magnitude, and their indices.

    Counts differ between workers, so it runs two rounds: all-gather the
    counts (one int64 each), then all-gather values and indices padded to the
    largest count. Meant for ``memory=ef``: small values wait in the residual
    until they have grown past ``tau``.
    """

    capabilities = Capabilities(summable=False, standalone=False, rounds=2)  # counts, then values

    def exchange(
        self, name: int, tensor: torch.Tensor, comm: Any, shapes: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.reshape(-1)
        idx = (flat.abs() >= self.options.tau).nonzero().squeeze(1)
        local = torch.zeros_like(flat)
        local[idx] = flat[idx]
        counts = comm.all_gather(torch.tensor([idx.numel()], dtype=torch.int64), dense_numel=0)
        width = int(counts.max())
        total = torch.zeros_like(flat)
        if width:
            values = flat.new_zeros(width)
            values[: idx.numel()] = flat[idx]
            indices = torch.zeros(width, dtype=bitpack.index_dtype(flat.numel()))
            indices[: idx.numel()] = idx.to(indices.dtype)
            send = torch.cat([values.view(torch.uint8), indices.view(torch.uint8)])
            parts = comm.all_gather(send, dense_numel=flat.numel()).view(comm.world_size, -1)
            value_bytes = width * flat.element_size()
            for count, part in zip(counts.view(-1).tolist(), parts):
                got_values = part[:value_bytes].clone().view(flat.dtype)[:count]
                got_indices = part[value_bytes:].clone().view(indices.dtype)[:count].long()
                total.index_add_(0, got_indices, got_values)
        return (total / comm.world_size).view_as(tensor), local.view_as(tensor)
