"""Structured channel / neuron pruning that physically removes what it prunes
(Li et al. 2017, "Pruning Filters for Efficient ConvNets"; dependency graph:
Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", torch-pruning).

1. Trace the model on an example input and group the parameters that must
   shrink together (a conv's output channels, the next conv's input
   channels, a norm's channels, the flattened features of the first Linear).
2. Score each group by the L1 or L2 norm of its weights.
3. Remove the lowest-scoring ``ratio`` of every layer's channels; the
   classifier's outputs are kept. The layers are rebuilt with fewer
   channels, so the dense model has fewer parameters and MACs and runs faster.

The architecture change is the tensors' new shapes: the artefact stores them
and its loader resizes a freshly built model to match.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shoal.compress.base import CompressError, Pruned, output_layer
from shoal.registry import PRUNERS


class ChannelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of each layer's channels / neurons removed")
    importance: Literal["l1", "l2"] = Field("l2", description="norm of a channel group's weights that ranks it")


@PRUNERS.register("channels", ChannelOptions)
def channels(options: ChannelOptions, model: nn.Module, example: torch.Tensor) -> Pruned:
    """Structured pruning with torch-pruning: removes whole channels / neurons, so the dense model shrinks."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        # Heads must be pruned whole and the embedding with every residual;
        # not wired up yet, so refuse rather than produce a broken model.
        raise CompressError("channels pruning does not support attention layers (nn.MultiheadAttention) yet; "
                            "use magnitude pruning for this model")
    import torch_pruning as tp

    importance = tp.importance.GroupMagnitudeImportance(p=1 if options.importance == "l1" else 2)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=importance, pruning_ratio=options.ratio, ignored_layers=[output_layer(model)],
    )
    pruner.step()
    return Pruned(model)
