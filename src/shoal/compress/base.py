"""What every compression step shares: the error type and a pruner's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

# Defined with the artefact file format, whose readers (in shoal.models) raise it too.
from shoal.models.artefact_file import CompressError


@dataclass
class Pruned:
    """A pruner's output: the model (pruned in place) and, for unstructured
    pruning, the boolean keep-mask of each pruned weight by parameter name
    (``"0.weight"``), so a later fine-tuning can hold the zeros fixed."""

    model: nn.Module
    masks: dict[str, Tensor] = field(default_factory=dict)


def output_layer(model: nn.Module) -> nn.Module:
    """The last Linear or ConvNd registered in the model: the classifier, whose
    outputs (the classes) must keep their number."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = module
    if last is None:
        raise CompressError("the model has no Linear or Conv layer to prune")
    return last
