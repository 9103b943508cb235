"""``regression``: real-valued outputs against float targets of the same size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoal.registry import TASKS
from shoal.tasks.base import Task, TaskOptions


def matched(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``targets`` as floats in ``outputs``' shape (``[B]`` targets fit ``[B, 1]`` outputs)."""
    if targets.shape != outputs.shape:
        if targets.numel() != outputs.numel():
            raise ValueError(f"regression: outputs {list(outputs.shape)} and targets {list(targets.shape)} "
                             "hold different numbers of values")
        targets = targets.reshape(outputs.shape)
    return targets.to(outputs.dtype)


@TASKS.register("regression", TaskOptions)
class Regression(Task):
    """Real values: mean squared error; test loss, mse (main, lower is better) and mae."""

    main_metric = "mse"
    higher_is_better = False
    metric_names = ("mse", "mae")
    sum_names = ("loss", "squared_error", "absolute_error", "count")
    main_range = (0.0, None)

    def default_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, matched(outputs, targets))

    def own_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        error = (outputs - matched(outputs, targets)).double()
        squared = error.square().sum()
        return {
            "loss": squared,
            "squared_error": squared,
            "absolute_error": error.abs().sum(),
            "count": float(outputs.numel()),  # means over every output value
        }

    def own_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {"mse": totals["squared_error"] / totals["count"], "mae": totals["absolute_error"] / totals["count"]}
