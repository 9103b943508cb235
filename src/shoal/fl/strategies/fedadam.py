"""``fedadam``: the server applies Adam to the averaged client change (Reddi et al. 2021)."""

from __future__ import annotations

import torch

from shoal.fl.strategies.fedopt import FedOpt, FedOptOptions
from shoal.registry import FED_STRATEGIES


@FED_STRATEGIES.register("fedadam", FedOptOptions)
class FedAdam(FedOpt):
    """FedOpt with Adam on the server, the averaged client change as its gradient (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.options.beta2).add_(square, alpha=1 - self.options.beta2)
