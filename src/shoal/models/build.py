"""Turn a model spec into an ``nn.Module`` for a dataset's shape."""

from __future__ import annotations

from torch import nn

from shoal.data.base import DatasetBundle
from shoal.registry import Component


def build_model(component: Component, data: DatasetBundle) -> nn.Module:
    """Registered models take ``(options, input_shape, num_classes)``; a user's
    ``module:function`` takes only its own options and returns the module."""
    if component.entry_point:
        model = component.target(**component.option_dict())
    else:
        model = component.target(component.options, data.input_shape, data.num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {component.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
