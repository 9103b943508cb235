"""A small causal (decoder-only) transformer language model (Radford et al. 2018, GPT).

Its vocabulary is the dataset's ``num_classes``: 256 byte values for ``text``.

1. Each token is embedded and given a learned position.
2. ``layers`` pre-norm blocks: ``x + attention(norm(x))`` with causal
   self-attention (``scaled_dot_product_attention(is_causal=True)``: position
   t sees positions <= t only), then ``x + mlp(norm(x))``.
3. A final norm and a linear head give one logit per vocabulary entry at
   every position: the distribution of the next token.

The model is an ``nn.Sequential`` of those parts, so the ``pipeline``
strategy cuts it between blocks like any layer sequence. Weights start as in
GPT-2 (normal, std 0.02; residual projections scaled by ``1/sqrt(2*layers)``),
so at initialisation the logits are near zero and the perplexity near the
vocabulary's size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from shoal.registry import MODELS


class LmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d_model: int = Field(64, ge=8)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(4, ge=1)
    ff: int | None = Field(None, ge=8, description="feed-forward width; none: 4 * d_model")
    dropout: float = Field(0.0, ge=0, lt=1)
    context: int = Field(256, ge=1, le=65536, description="longest sequence the positions cover")


class TokenEmbedding(nn.Module):
    """Token embedding plus learned positional embedding: ``[B, T]`` ids -> ``[B, T, d]``."""

    def __init__(self, vocab: int, d_model: int, context: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > self.position.num_embeddings:
            raise ValueError(f"transformer_lm: sequence of {x.shape[-1]} tokens is longer than its "
                             f"context={self.position.num_embeddings}")
        positions = torch.arange(x.shape[-1], device=x.device)
        return self.dropout(self.token(x) + self.position(positions))


class CausalBlock(nn.Module):
    """Pre-norm block: causal multi-head self-attention, then a GELU MLP, each residual."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model), nn.Dropout(dropout))
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        # [B, T, d] -> [B, heads, T, d / heads]
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                  is_causal=True)
        x = x + self.residual_dropout(self.proj(attended.transpose(1, 2).reshape(batch, tokens, width)))
        return x + self.mlp(self.norm2(x))


def causal_lm(options: LmOptions, vocab: int) -> nn.Sequential:
    """Embedding, causal blocks, final norm, head: ``[B, T]`` ids -> ``[B, T, vocab]`` logits.

    A plain ``nn.Sequential`` (not a subclass: slicing one builds its class
    from the sliced layers, which a subclass's constructor would not take).
    """
    if options.d_model % options.heads:
        raise ValueError(f"transformer_lm d_model {options.d_model} must be divisible by heads {options.heads}")
    ff = options.ff or 4 * options.d_model
    blocks = [CausalBlock(options.d_model, options.heads, ff, options.dropout) for _ in range(options.layers)]
    model = nn.Sequential(
        TokenEmbedding(vocab, options.d_model, options.context, options.dropout),
        *blocks,
        nn.LayerNorm(options.d_model),
        nn.Linear(options.d_model, vocab),
    )
    model.apply(_init_weights)
    for block in blocks:
        for residual_out in (block.proj, block.mlp[2]):
            nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * options.layers))
    return model


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@MODELS.register("transformer_lm", LmOptions)
def transformer_lm(options: LmOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small causal transformer: next-token logits at every position (task: language_model)."""
    if len(input_shape) != 1:
        raise ValueError(f"transformer_lm needs token sequences (a dataset like 'text': input shape (seq_len,)), "
                         f"got input shape {input_shape}")
    if input_shape[0] > options.context:
        raise ValueError(f"transformer_lm context={options.context} is shorter than the dataset's "
                         f"seq_len={input_shape[0]}")
    return causal_lm(options, vocab=num_classes)
