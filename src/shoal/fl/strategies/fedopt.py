"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization").

The averaged client change Delta is a pseudo-gradient. The server keeps a
first moment m <- b1*m + (1-b1)*Delta and a second moment v updated by the
subclass (Adagrad, Adam or Yogi), and moves w <- w + eta * m / (sqrt(v) + tau).
tau bounds the step where v is tiny; the paper's grid puts it near 1e-3.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.fl.strategies.base import ClientResult, FedStrategy, weighted_mean


class FedOptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eta: float = Field(0.01, gt=0, description="server learning rate")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity floor")


class FedOpt(FedStrategy):
    def __init__(self, options: FedOptOptions):
        super().__init__(options)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        o = self.options
        delta = weighted_mean(results)
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(delta), torch.zeros_like(delta)
        self.m.mul_(o.beta1).add_(delta, alpha=1 - o.beta1)
        self.v = self.second_moment(self.v, delta * delta)
        return weights + o.eta * self.m / (self.v.sqrt() + o.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")
