"""``fedyogi``: Yogi's additive second moment on the server (Zaheer et al. 2018; Reddi et al. 2021).

v <- v - (1-b2) * Delta^2 * sign(v - Delta^2): v grows or shrinks towards
Delta^2 by a bounded amount, so one large round cannot blow up the step.
"""

from __future__ import annotations

import torch

from shoal.fl.strategies.fedopt import FedOpt, FedOptOptions
from shoal.registry import FED_STRATEGIES


@FED_STRATEGIES.register("fedyogi", FedOptOptions)
class FedYogi(FedOpt):
    """FedOpt with Yogi's bounded additive second moment on the server (Zaheer et al. 2018)."""

    def second_moment(self, v: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
        return v.sub_((1 - self.options.beta2) * square * torch.sign(v - square))
