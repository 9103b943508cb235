"""``fedprox:mu=M``: FedAvg with a proximal term on the client (Li et al. 2020).

Each client minimises its loss plus mu/2 * ||w - w_global||^2, which keeps
local models near the global one when data are heterogeneous. The term is
added by shoal's client (``shoal.fl.local``) from the ``mu`` this strategy
puts in the round config; aggregation is FedAvg's.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.fl.strategies.base import ClientResult, FedStrategy, weighted_mean
from shoal.registry import FED_STRATEGIES


class FedProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.1, ge=0, description="weight of the proximal term")


@FED_STRATEGIES.register("fedprox", FedProxOptions)
class FedProx(FedStrategy):
    """FedAvg with a proximal term mu/2 * ||w - w_global||^2 on each client (Li et al. 2020)."""

    def client_config(self, rnd: int) -> dict[str, Any]:
        return {"mu": self.options.mu}

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        return weights + weighted_mean(results)
