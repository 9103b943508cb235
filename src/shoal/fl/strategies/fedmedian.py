"""``fedmedian``: the coordinate-wise median of the clients' models (Yin et al. 2018).

Robust to a minority of arbitrary (Byzantine) updates: no single client can
move a coordinate past the honest clients' range. Sample counts are ignored.
"""

from __future__ import annotations

import torch

from shoal.fl.strategies.base import ClientResult, FedStrategy
from shoal.registry import FED_STRATEGIES, NoOptions


@FED_STRATEGIES.register("fedmedian", NoOptions)
class FedMedian(FedStrategy):
    """Coordinate-wise median of the clients' models, robust to a Byzantine minority (Yin et al. 2018)."""

    aggregates_mean = False  # a robust rule: DP-FedAvg cannot wrap it

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        ordered = torch.stack([r.delta for r in results]).sort(dim=0).values
        k = len(results)
        middle = ordered[(k - 1) // 2 : k // 2 + 1]  # one value for odd K, the two middle ones for even K
        return weights + middle.mean(dim=0)
