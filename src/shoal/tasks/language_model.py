"""``language_model``: next-token logits ``[B, T, V]`` against token ids ``[B, T]``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from shoal.registry import TASKS
from shoal.tasks.base import Task, TaskOptions


class LanguageModelOptions(TaskOptions):
    ignore_index: int = Field(-100, description="target id that counts for nothing (padding), as in "
                              "torch.nn.functional.cross_entropy")


def flat(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, V]`` logits and ``[B, T]`` ids as ``[B*T, V]`` and ``[B*T]``."""
    if outputs.dim() != 3 or targets.shape != outputs.shape[:2]:
        raise ValueError(f"language_model: needs logits [B, T, V] and token ids [B, T]; got outputs "
                         f"{list(outputs.shape)} and targets {list(targets.shape)}")
    return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)


@TASKS.register("language_model", LanguageModelOptions)
class LanguageModel(Task):
    """Token ids: token-level cross-entropy; test loss, perplexity (main, lower is better), token accuracy."""

    Options = LanguageModelOptions
    main_metric = "perplexity"
    higher_is_better = False
    metric_names = ("perplexity", "token_accuracy")
    # nll stays cross-entropy when a user's loss replaces ``loss``: perplexity is exp of the mean token nll.
    sum_names = ("loss", "nll", "correct", "count")
    main_range = (1.0, None)

    def default_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*flat(outputs, targets), ignore_index=self.options.ignore_index)

    def own_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        logits, ids = flat(outputs, targets)
        counted = ids != self.options.ignore_index
        nll = F.cross_entropy(logits, ids, ignore_index=self.options.ignore_index, reduction="sum").double()
        return {
            "loss": nll,
            "nll": nll,
            "correct": ((logits.argmax(dim=1) == ids) & counted).sum().double(),
            "count": float(counted.sum()),  # tokens
        }

    def own_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        mean_nll = totals["nll"] / totals["count"]
        return {"perplexity": math.exp(mean_nll) if mean_nll < 709 else math.inf,  # exp(709) overflows a float
                "token_accuracy": totals["correct"] / totals["count"]}
