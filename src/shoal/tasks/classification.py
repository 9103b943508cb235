"""``classification``: logits ``[B, C]`` against class indices ``[B]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoal.registry import TASKS
from shoal.tasks.base import Task, TaskOptions


@TASKS.register("classification", TaskOptions)
class Classification(Task):
    """Class labels: cross-entropy; test loss and accuracy (main, higher is better)."""

    main_metric = "accuracy"
    higher_is_better = True
    metric_names = ("accuracy",)
    sum_names = ("loss", "correct", "count")
    main_range = (0.0, 1.0)

    def default_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def own_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        return {
            "loss": F.cross_entropy(outputs, targets, reduction="sum").double(),
            "correct": (outputs.argmax(dim=1) == targets).sum().double(),
            "count": float(len(targets)),
        }

    def own_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {"accuracy": totals["correct"] / totals["count"]}
