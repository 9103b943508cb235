"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shoal.registry import MODELS


class MlpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="width of each hidden layer")


@MODELS.register("mlp", MlpOptions)
def mlp(options: MlpOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden width, then a linear classifier."""
    if any(h < 1 for h in options.hidden):
        raise ValueError(f"mlp hidden widths must be >= 1, got {options.hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in options.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
