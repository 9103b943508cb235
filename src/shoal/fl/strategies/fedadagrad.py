"""``fedadagrad``: Adagrad's accumulated second moment on the server (Reddi et al. 2021)."""

from __future__ import annotations

import torch

from shoal.fl.strategies.fedopt import FedOpt, FedOptOptions
from shoal.registry import FED_STRATEGIES


@FED_STRATEGIES.register("fedadagrad", FedOptOptions)
class FedAdagrad(FedOpt):
    """FedOpt with Adagrad's accumulated second moment on the server (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return v.add_(square)
