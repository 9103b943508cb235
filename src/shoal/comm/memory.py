"""Error feedback: what a codec did not send is added to the next gradient.

With error feedback (Seide et al. 2014; Karimireddy et al. 2019) a biased
compressor still converges: the residual ``e = (g + e) - decode(encode(g + e))``
is kept per bucket and added back before the next encoding. Works with any
codec; the codec never knows.
"""

from __future__ import annotations

from typing import Any

import torch


class ErrorFeedback:
    def __init__(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}

    def compensate(self, name: int, grad: torch.Tensor) -> torch.Tensor:
        residual = self.residuals.get(name)
        # DDP rebuilds its buckets after the first step; a residual of another size is stale.
        if residual is None or residual.shape != grad.shape:
            return grad
        return grad + residual

    def update(self, name: int, compensated: torch.Tensor, decoded: torch.Tensor) -> None:
        self.residuals[name] = compensated - decoded

    def repack(self, name: int, old: torch.Tensor | None, new: torch.Tensor, numel: int) -> None:
        """The bucket ``name`` is now sent as its entries ``new`` (indices into
        its ``numel`` values) instead of ``old`` (None: all of them): keep the
        residual of the entries still sent, drop the rest."""
        residual = self.residuals.get(name)
        if residual is None:
            return
        if old is None and residual.numel() == new.numel() != numel:
            return  # already in this packing: a resumed run's residual, saved packed
        if old is None:
            dense = residual if residual.numel() == numel else None
        else:
            dense = residual.new_zeros(numel).index_put_((old,), residual) if residual.numel() == old.numel() else None
        if dense is None:  # stale (DDP rebuilt its buckets): nothing to carry over
            del self.residuals[name]
        else:
            self.residuals[name] = dense.reshape(-1)[new]

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.cpu() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = dict(state.get("residuals", {}))
