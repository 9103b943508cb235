"""A tiny transformer encoder classifier (Vaswani et al. 2017) over sequences or image pixels.

A (C, L) signal is read as L tokens of C features; a (C, H, W) image as H*W
tokens of C features. Tokens are embedded linearly, given learned positions,
encoded, mean-pooled and classified.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from shoal.registry import MODELS


class TransformerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d_model: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1, le=24)
    ff: int = Field(128, ge=8, description="feed-forward width")
    dropout: float = Field(0.0, ge=0, lt=1)


class TinyTransformer(nn.Module):
    def __init__(self, options: TransformerOptions, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if options.d_model % options.heads:
            raise ValueError(f"transformer d_model {options.d_model} must be divisible by heads {options.heads}")
        if len(input_shape) not in (2, 3):
            raise ValueError(f"transformer needs (C, L) or (C, H, W) inputs, got {input_shape}")
        channels, tokens = input_shape[0], int(torch.tensor(input_shape[1:]).prod())
        self.embed = nn.Linear(channels, options.d_model)
        self.position = nn.Parameter(torch.zeros(1, tokens, options.d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            options.d_model, options.heads, options.ff, options.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(options.d_model)
        self.head = nn.Linear(options.d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, T) -> (B, T, C)
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


@MODELS.register("transformer", TransformerOptions)
def transformer(options: TransformerOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Tiny pre-norm transformer encoder with mean pooling."""
    return TinyTransformer(options, input_shape, num_classes)
