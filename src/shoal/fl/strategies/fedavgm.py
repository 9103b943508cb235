"""``fedavgm:server_lr=E,momentum=B``: FedAvg with server momentum (Hsu et al. 2019).

The averaged client change is a pseudo-gradient; the server keeps a momentum
buffer v <- B*v + mean(delta) and moves w <- w + E*v.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.fl.strategies.base import ClientResult, FedStrategy, weighted_mean
from shoal.registry import FED_STRATEGIES


class FedAvgMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


@FED_STRATEGIES.register("fedavgm", FedAvgMOptions)
class FedAvgM(FedStrategy):
    """FedAvg with server momentum on the averaged client change (Hsu et al. 2019)."""

    def __init__(self, options: FedAvgMOptions):
        super().__init__(options)
        self.velocity: torch.Tensor | None = None

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        step = weighted_mean(results)
        self.velocity = step if self.velocity is None else self.velocity.mul_(self.options.momentum).add_(step)
        return weights + self.options.server_lr * self.velocity

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.velocity = state.get("velocity")
