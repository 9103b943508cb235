"""``powersgd``: rank-r approximation by one step of power iteration
(Vogels et al. 2019), warm-started from the previous step's factor."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from shoal.comm.codecs.base import Codec, CodecOptions
from shoal.registry import CODECS


class PowerSgdOptions(CodecOptions):
    rank: int = Field(2, ge=1, le=64, description="r: columns of the low-rank factors")
    warm_start: bool = Field(True, description="reuse last step's Q instead of a fresh random one")
    seed: int = Field(0, description="shared by all workers: the first Q must agree")


@CODECS.register("powersgd", PowerSgdOptions)
class PowerSgdCodec(Codec):
    """Each bucket viewed as an a x b matrix M (padded), per step:

    1. P = mean_workers(M Q)            (all-reduce, a x r)
    2. P = orthonormal basis of P        (QR)
    3. Q = mean_workers(M^T P)          (all-reduce, b x r)
    4. result = P Q^T, the rank-r estimate of mean M
    Buckets too small to gain are all-reduced as they are. Use with
    ``memory=ef``, as the paper does.
    """

    summable = True

    def __init__(self, options: PowerSgdOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.generator = torch.Generator().manual_seed(options.seed)  # same on every worker
        self.q: dict[int, torch.Tensor] = {}

    @staticmethod
    def shape_for(numel: int) -> tuple[int, int]:
        cols = max(1, math.isqrt(numel))
        return math.ceil(numel / cols), cols

    def exchange(self, name: int, tensor: torch.Tensor, comm: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n, r = tensor.numel(), self.options.rank
        rows, cols = self.shape_for(n)
        if (rows + cols) * r >= n:
            out = comm.all_reduce(tensor.clone(), dense_numel=n).div_(comm.world_size)
            return out, out
        matrix = torch.zeros(rows * cols, dtype=torch.float32, device=tensor.device)
        matrix[:n] = tensor.reshape(-1)
        matrix = matrix.view(rows, cols)
        q = self.q.get(name)
        if q is None or q.shape != (cols, r) or not self.options.warm_start:
            q = torch.randn(cols, r, generator=self.generator).to(tensor.device)
        p = comm.all_reduce(matrix @ q, dense_numel=n).div_(comm.world_size)
        p = torch.linalg.qr(p).Q
        q = comm.all_reduce(matrix.T @ p, dense_numel=0).div_(comm.world_size)
        self.q[name] = q
        out = (p @ q.T).reshape(-1)[:n].view_as(tensor).to(tensor.dtype)
        return out, out

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.cpu() for k, v in self.q.items()}, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = dict(state.get("q", {}))
        if "generator" in state:
            self.generator.set_state(state["generator"])
