"""``powersgd``: rank-r approximation by one step of power iteration
(Vogels et al. 2019), warm-started from the previous step's factor."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from shoal.comm import layout
from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions
from shoal.registry import CODECS


class PowerSgdOptions(CodecOptions):
    rank: int = Field(2, ge=1, le=64, description="r: columns of the low-rank factors")
    warm_start: bool = Field(True, description="reuse last step's Q instead of a fresh random one")
    seed: int = Field(0, description="shared by all workers: the first Q must agree")


@CODECS.register("powersgd", PowerSgdOptions)
class PowerSgdCodec(Codec):
    """Rank-r estimate of each gradient matrix by one step of power iteration; its two factors all-reduced.

    Each gradient tensor of 2 or more dimensions is viewed as a matrix M
    (first dimension x the rest, as PyTorch's hook does); per step:

    1. everything not worth compressing (biases, norms, small matrices):
       one plain all-reduce
    2. P = mean_workers(M Q) for every M     (one all-reduce, a x r each)
    3. P = orthonormal basis of P             (QR)
    4. Q = mean_workers(M^T P)               (one all-reduce, b x r each)
    5. result = P Q^T, the rank-r estimate of mean M
    Without tensor shapes (a bare flat tensor) the whole tensor is one
    near-square matrix, zero-padded. Use with ``memory=ef``, as the paper does.
    """

    capabilities = Capabilities(summable=True, standalone=False, rounds=2)  # P, then Q

    def __init__(self, options: PowerSgdOptions, *, rank: int = 0):
        super().__init__(options, rank=rank)
        self.generator = torch.Generator().manual_seed(options.seed)  # same on every worker
        self.q: dict[str, torch.Tensor] = {}

    @staticmethod
    def shape_for(numel: int) -> tuple[int, int]:
        cols = max(1, math.isqrt(numel))
        return math.ceil(numel / cols), cols

    def _layout(self, numel: int, shapes: list[torch.Size] | None) -> list[tuple[int, int, int, int]]:
        """(offset, numel, rows, cols) per piece of the flat tensor; rows = 0: sent as it is."""
        if not shapes or sum(math.prod(s) for s in shapes) != numel:
            rows, cols = self.shape_for(numel)
            return [(0, numel, rows, cols)] if self._worth(rows, cols, numel) else [(0, numel, 0, 0)]
        pieces, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 0
            cols = n // rows if rows else 0
            pieces.append((offset, n, rows, cols) if rows and self._worth(rows, cols, n) else (offset, n, 0, 0))
            offset += n
        return pieces

    def _worth(self, rows: int, cols: int, numel: int) -> bool:
        return (rows + cols) * self.options.rank < numel

    def exchange(
        self, name: int, tensor: torch.Tensor, comm: Any, shapes: list[torch.Size] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.reshape(-1).float()
        world, r = comm.world_size, self.options.rank
        pieces = self._layout(flat.numel(), shapes)
        out = torch.empty_like(flat)
        dense = [(o, n) for o, n, rows, _ in pieces if not rows]
        if dense:
            sent = torch.cat([flat[o : o + n] for o, n in dense])
            mean = comm.all_reduce(sent, dense_numel=sent.numel()).div_(world)
            at = 0
            for o, n in dense:
                out[o : o + n] = mean[at : at + n]
                at += n
        matrices = [(o, n, rows, cols) for o, n, rows, cols in pieces if rows]
        if matrices:
            ms, qs = [], []
            for i, (o, n, rows, cols) in enumerate(matrices):
                m = flat[o : o + n]
                if rows * cols > n:  # the padded whole-tensor matrix
                    m = torch.cat([m, m.new_zeros(rows * cols - n)])
                ms.append(m.view(rows, cols))
                q = self.q.get(f"{name}.{i}")
                if q is None or q.shape != (cols, r) or not self.options.warm_start:
                    q = torch.randn(cols, r, generator=self.generator).to(flat.device)
                qs.append(q)
            ps = self._mean_round([m @ q for m, q in zip(ms, qs)], comm, sum(n for _, n, _, _ in matrices))
            ps = [torch.linalg.qr(p).Q for p in ps]
            qs = self._mean_round([m.T @ p for m, p in zip(ms, ps)], comm, 0)
            for i, ((o, n, _, _), p, q) in enumerate(zip(matrices, ps, qs)):
                self.q[f"{name}.{i}"] = q
                out[o : o + n] = (p @ q.T).reshape(-1)[:n]
        result = out.view_as(tensor).to(tensor.dtype)
        return result, result

    @staticmethod
    def _mean_round(parts: list[torch.Tensor], comm: Any, dense_numel: int) -> list[torch.Tensor]:
        """Mean over workers of several small matrices in one all-reduce."""
        mean = comm.all_reduce(layout.flatten(parts), dense_numel=dense_numel)
        mean.div_(comm.world_size)
        return list(layout.pieces(mean, parts))

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.cpu() for k, v in self.q.items()}, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = {str(k): v for k, v in state.get("q", {}).items()}
        if "generator" in state:
            self.generator.set_state(state["generator"])
