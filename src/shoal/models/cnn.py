"""Small convolutional classifiers: ``cnn1d`` for signals (C, L), ``cnn2d`` for images (C, H, W)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shoal.registry import MODELS


class Cnn1dOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(32, ge=1, description="channels of the first conv")
    growth: int = Field(2, ge=1, le=8, description="the second and third convs have channels x growth")
    first_stride: int = Field(1, ge=1, le=4, description="stride of the first conv (the others: 2)")
    padding: int | None = Field(None, ge=0, le=4, description="padding of every conv (default: kernel // 2)")
    hidden: int = Field(256, ge=1, description="width of the fully connected layer")
    fc_layers: int = Field(1, ge=0, le=8, description="hidden fully connected layers (0: the convs feed "
                           "the output layer)")


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
    """Three 1-D convolutions (kernels 5, 3, 3; the second and third stride 2) and an MLP head.

    ``cnn1d:channels=25,growth=1,first_stride=2,padding=1,fc_layers=0`` is the
    MNIST-1D paper's small CNN (Greydanus & Kobak 2020, ``ConvBase``: three
    25-channel stride-2 convs and one linear layer, 5,210 parameters).
    """
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs inputs shaped (channels, length), got {input_shape}")
    c, wide = options.channels, options.channels * options.growth
    pad = options.padding

    def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv1d:
        return nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2 if pad is None else pad)

    body = nn.Sequential(
        conv(input_shape[0], c, 5, options.first_stride),
        nn.ReLU(),
        conv(c, wide, 3, 2),
        nn.ReLU(),
        conv(wide, wide, 3, 2),
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
