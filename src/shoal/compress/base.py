"""What every compression step shares: the error type and a pruner's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


class CompressError(ValueError):
    """Input that cannot be compressed (bad spec, a checkpoint that does not fit
    the config); the message says what and where. The CLI exits with code 2."""


@dataclass
class Pruned:
    """A pruner's output: the model (pruned in place) and, for unstructured
    pruning, the boolean keep-mask of each pruned weight by parameter name
    (``"0.weight"``), so a later fine-tuning can hold the zeros fixed."""

    model: nn.Module
    masks: dict[str, Tensor] = field(default_factory=dict)


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, attribute)`` of every weight matrix or kernel:
    a module's own parameter whose name ends in ``weight`` and has two or more
    dimensions (Linear, ConvNd, attention projections). Biases and norm scales
    are left dense: they are few and pruning them buys nothing."""
    found = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if attr.endswith("weight") and param.dim() >= 2:
                found.append((f"{module_name}.{attr}" if module_name else attr, module, attr))
    return found


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
