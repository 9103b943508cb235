"""A small residual network (He et al. 2016) for 1-D signals or 2-D images."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from shoal.registry import MODELS


class ResnetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(16, ge=1, description="channels of the first stage; each stage doubles")
    stages: int = Field(3, ge=1, le=5)
    blocks: int = Field(1, ge=1, le=8, description="residual blocks per stage")


class _Block(nn.Module):
    def __init__(self, conv, norm, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.relu = nn.ReLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.skip(x))


@MODELS.register("resnet", ResnetOptions)
def resnet(options: ResnetOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Stem conv, ``stages`` groups of basic blocks (stride 2 after the first), global pool."""
    if len(input_shape) == 2:
        conv, norm, pool = nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d(1)
    elif len(input_shape) == 3:
        conv, norm, pool = nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d(1)
    else:
        raise ValueError(f"resnet needs (C, L) or (C, H, W) inputs, got {input_shape}")
    w = options.width
    layers: list[nn.Module] = [conv(input_shape[0], w, 3, padding=1, bias=False), norm(w), nn.ReLU()]
    c_in = w
    for stage in range(options.stages):
        c_out = w * 2**stage
        for block in range(options.blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_Block(conv, norm, c_in, c_out, stride))
            c_in = c_out
    layers += [pool, nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
