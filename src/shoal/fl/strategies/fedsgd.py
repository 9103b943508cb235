"""``fedsgd``: federated SGD, the baseline FedAvg is measured against (McMahan et al. 2017).

Each selected client takes exactly one gradient step on all its local data
(one full batch, the client learning rate, no momentum); the server averages
the steps weighted by sample count. With C clients per round this is
large-batch SGD: one update per round, where FedAvg makes E*n/B local ones.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.fl.strategies.base import ClientResult, FedStrategy, weighted_mean
from shoal.registry import FED_STRATEGIES, NoOptions


@FED_STRATEGIES.register("fedsgd", NoOptions)
class FedSgd(FedStrategy):
    """Federated SGD: one full-batch gradient step per client and round, averaged (McMahan et al. 2017)."""

    def client_config(self, rnd: int) -> dict[str, Any]:
        return {"full_batch_step": True}

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        return weights + weighted_mean(results)
