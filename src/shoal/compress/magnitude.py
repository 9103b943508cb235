"""Unstructured magnitude pruning, one-shot (Han et al. 2015, "Learning both
Weights and Connections for Efficient Neural Networks").

1. Gather every weight matrix and kernel (biases and norm scales stay dense).
2. ``scope=global``: rank all their entries together by absolute value and
   zero the ``round(sparsity * total)`` smallest, so layers with many small
   weights lose more; ``scope=layer``: the same fraction of each layer.
3. The masks are ``torch.nn.utils.prune`` masks; they are made permanent
   (``prune.remove``) and returned, so a later fine-tuning can keep them.

Masks alone make no model faster on a dense runtime; they make it smaller
once stored sparse (:mod:`shoal.models.artefact_file`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import prune

from shoal.compress.base import Pruned
from shoal.registry import PRUNERS
from shoal.engine.sparsity import weight_slots


class MagnitudeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(0.9, gt=0, lt=1, description="fraction of the weights set to zero")
    scope: Literal["global", "layer"] = Field("global", description="rank weights across all layers or per layer")
    schedule: Literal["oneshot", "gradual"] = Field(
        "oneshot", description="oneshot: prune now; gradual: reach the sparsity during --finetune along Zhu & "
        "Gupta's cubic schedule (global scope)")

    @model_validator(mode="after")
    def _gradual_is_global(self) -> "MagnitudeOptions":
        if self.schedule == "gradual" and self.scope != "global":
            raise ValueError("schedule=gradual prunes globally (scope=global)")
        return self


@PRUNERS.register("magnitude", MagnitudeOptions)
def magnitude(options: MagnitudeOptions, model: nn.Module, example: torch.Tensor) -> Pruned:
    """Unstructured magnitude pruning of weights, global (default) or per layer; zeros, no shrinking."""
    if options.schedule == "gradual":
        return Pruned(model)  # the masks grow during fine-tuning (shoal.compress.finetune)
    targets = weight_slots(model)
    if options.scope == "global":
        prune.global_unstructured(
            [(module, attr) for _, module, attr in targets], pruning_method=prune.L1Unstructured,
            amount=options.sparsity,
        )
    else:
        for _, module, attr in targets:
            prune.l1_unstructured(module, attr, amount=options.sparsity)
    masks = {}
    for name, module, attr in targets:
        masks[name] = getattr(module, f"{attr}_mask").bool().clone()
        prune.remove(module, attr)  # weight = weight_orig * mask, as a plain parameter again
    return Pruned(model, masks)
