"""Packing small unsigned codes (1, 2 or 4 bits each) into bytes, and back.

Sub-byte codecs (sign, ternary, low-level QSGD) send their codes packed, so a
payload's byte count is what a network would carry.
"""

from __future__ import annotations

import numpy as np
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


def pack_wide(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers each < 2**bits (1 <= bits <= 32) -> ceil(n * bits / 8) bytes, little-endian bit order.

    For fixed-point codes of any width (secure aggregation's residues mod 2**b): the
    narrow widths above pack faster, these pack exactly.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    values = np.ascontiguousarray(values, dtype="<u4").reshape(-1)
    planes = np.unpackbits(values.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_wide(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_wide`: ``numel`` uint32 values; ValueError if the byte count does not match."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    expected = wide_bytes(numel, bits)
    if packed.size != expected:
        raise ValueError(f"{packed.size} bytes, {numel} values of {bits} bits take {expected}")
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: numel * bits].reshape(numel, bits)
    full = np.zeros((numel, 32), dtype=np.uint8)
    full[:, :bits] = planes
    return np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(-1).astype(np.uint32)


def wide_bytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_wide` makes of ``numel`` values of ``bits`` bits."""
    return (numel * bits + 7) // 8
