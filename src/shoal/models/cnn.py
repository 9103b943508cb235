"""Small convolutional classifiers: ``cnn1d`` for signals (C, L), ``cnn2d`` for images (C, H, W)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shoal.registry import MODELS


class Cnn1dOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(32, ge=1, description="channels of the first conv; later ones double")
    hidden: int = Field(256, ge=1, description="width of the fully connected layer")
    fc_layers: int = Field(1, ge=1, le=8, description="hidden fully connected layers")


def _head(features: int, hidden: int, layers: int, num_classes: int) -> list[nn.Module]:
    mods: list[nn.Module] = [nn.Flatten()]
    for _ in range(layers):
        mods += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    return mods + [nn.Linear(features, num_classes)]


def _flat_size(body: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *input_shape)).numel()


@MODELS.register("cnn1d", Cnn1dOptions)
def cnn1d(options: Cnn1dOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Three 1-D convolutions (the second and third stride 2) and an MLP head."""
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs inputs shaped (channels, length), got {input_shape}")
    c = options.channels
    body = nn.Sequential(
        nn.Conv1d(input_shape[0], c, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(c, 2 * c, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(2 * c, 2 * c, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    head = _head(_flat_size(body, input_shape), options.hidden, options.fc_layers, num_classes)
    return nn.Sequential(*body, *head)


class Cnn2dOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(16, ge=1)
    hidden: int = Field(128, ge=1)


@MODELS.register("cnn2d", Cnn2dOptions)
def cnn2d(options: Cnn2dOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and an MLP head (sized for 8x8 to 32x32 images)."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn2d needs inputs shaped (channels, height, width), got {input_shape}")
    c = options.channels
    body = nn.Sequential(
        nn.Conv2d(input_shape[0], c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    head = _head(_flat_size(body, input_shape), options.hidden, 1, num_classes)
    return nn.Sequential(*body, *head)
