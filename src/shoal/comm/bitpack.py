"""Packing small unsigned codes (1, 2 or 4 bits each) into bytes, and back.

Sub-byte codecs (sign, ternary, low-level QSGD) send their codes packed, so a
payload's byte count is what a network would carry.
"""

from __future__ import annotations

import torch

_WIDTHS = (1, 2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes each < 2**bits -> uint8 tensor of ceil(n * bits / 8) bytes."""
    if bits not in _WIDTHS:
        raise ValueError(f"bits must be one of {_WIDTHS}, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    groups = codes.view(-1, per_byte)
    # Byte-wide shifts and ors, one pass per slot: no widening to int32.
    packed = groups[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= groups[:, slot] << (slot * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    if bits not in _WIDTHS:
        raise ValueError(f"bits must be one of {_WIDTHS}, got {bits}")
    if bits == 8:
        return packed[:numel]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=1).reshape(-1)[:numel]


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest signed integer type that holds indices < numel (gloo has no uint16/uint32)."""
    if numel <= 2**15:
        return torch.int16
    if numel <= 2**31:
        return torch.int32
    return torch.int64
