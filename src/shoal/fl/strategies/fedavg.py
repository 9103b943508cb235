"""``fedavg``: federated averaging (McMahan et al. 2017).

The new global model is the mean of the clients' models weighted by their
sample counts: w <- w + sum_k n_k/n * delta_k.
"""

from __future__ import annotations

import torch

from shoal.fl.strategies.base import ClientResult, FedStrategy, weighted_mean
from shoal.registry import FED_STRATEGIES, NoOptions


@FED_STRATEGIES.register("fedavg", NoOptions)
class FedAvg(FedStrategy):
    """Federated averaging: the clients' models weighted by their sample counts (McMahan et al. 2017)."""

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        return weights + weighted_mean(results)
