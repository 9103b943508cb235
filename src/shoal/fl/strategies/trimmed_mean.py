"""``trimmed_mean:beta=B``: coordinate-wise trimmed mean (Yin et al. 2018).

For every coordinate the largest and the smallest ``floor(B * K)`` of the K
client values are dropped and the rest averaged: robust to up to that many
arbitrary clients, closer to the mean than the median is.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from shoal.fl.strategies.base import ClientResult, FedStrategy
from shoal.registry import FED_STRATEGIES


class TrimmedMeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, ge=0, lt=0.5, description="share trimmed at each end")


@FED_STRATEGIES.register("trimmed_mean", TrimmedMeanOptions)
class TrimmedMean(FedStrategy):
    """Coordinate-wise mean without each coordinate's beta largest and smallest values (Yin et al. 2018)."""

    aggregates_mean = False  # a robust rule: DP-FedAvg cannot wrap it

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        k = len(results)
        cut = int(self.options.beta * k)
        ordered = torch.stack([r.delta for r in results]).sort(dim=0).values
        return weights + ordered[cut : k - cut].mean(dim=0)
