"""The message format for tensors between a federation's server and clients.

A peer on the network may be anyone, so a message must be safe to parse when
it was written by an attacker: no pickle (``torch.load`` of an untrusted file
runs code), a JSON header that says exactly what follows, and every number in
it checked against the bytes that actually arrived before a tensor is built.

Layout, in order::

    b"SHFL"                 magic
    0x01                    version
    uint32 little-endian    header length H
    H bytes                 UTF-8 JSON {"meta": {...}, "tensors": [
                              {"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    payload                 each tensor's contiguous little-endian bytes, in
                            header order, offsets counted from the payload start

``unpack`` rejects a message with a :class:`WireError` whose text is the
reason, so the server can log why a peer was turned away.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

MAGIC = b"SHFL"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
# torch itself allows at most 64 dimensions; no model tensor comes close.
MAX_DIMS = 64
# Elements in one tensor, counting zero-sized dimensions as 1: an empty tensor
# of shape (0, 2**63) matches its 0 bytes yet overflows torch's strides.
MAX_ELEMENTS = 1 << 40

_PREFIX = struct.Struct("<4sBI")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ENTRY_KEYS = {"name", "dtype", "shape", "offset", "nbytes"}


class WireError(ValueError):
    """A malformed message; the text says what is wrong with it."""


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors take in a message, header excluded."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """Encode ``meta`` (any JSON object) and named tensors as one message."""
    _require_little_endian()
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    entries = []
    chunks = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if tensor.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, allowed: {', '.join(DTYPES)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        # Viewing as bytes keeps bfloat16, which numpy has no type for.
        raw = flat.view(torch.uint8).numpy().tobytes()
        entries.append(
            {"name": name, "dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
             "offset": offset, "nbytes": len(raw)}
        )
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "tensors": entries}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(header)} bytes, the limit is {MAX_HEADER_BYTES}")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *chunks])


def unpack(data: bytes, *, max_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Decode a message from :func:`pack`; raise :class:`WireError` if it is not one.

    The tensors returned own their memory and are writable; nothing refers
    back to ``data``.
    """
    data, header, payload = _split(data, max_bytes)
    tensors: dict[str, torch.Tensor] = {}
    expected = 0
    for i, entry in enumerate(header["tensors"]):
        name, dtype, shape, offset, nbytes = _check_entry(i, entry)
        if name in tensors:
            raise WireError(f"duplicate tensor name {name!r}")
        if offset < expected:
            raise WireError(f"tensor {name!r} at offset {offset} overlaps the previous one (ends at {expected})")
        if offset > expected:
            raise WireError(f"tensor {name!r} at offset {offset} leaves a gap after {expected}")
        if offset + nbytes > len(payload):
            raise WireError(f"tensor {name!r} ({offset}+{nbytes}) runs past the {len(payload)}-byte payload")
        tensors[name] = _tensor(payload[offset:offset + nbytes], dtype, shape)
        expected = offset + nbytes
    if expected != len(payload):
        raise WireError(f"{len(payload) - expected} trailing bytes after the last tensor")
    return header["meta"], tensors


def peek_meta(data: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """A message's ``meta`` alone, its tensors left unread (to check a token first).

    Raises :class:`WireError` for what :func:`unpack` would refuse up to the
    end of the header.
    """
    return _split(data, max_bytes)[1]["meta"]


def _split(data: bytes, max_bytes: int | None) -> tuple[memoryview, dict[str, Any], memoryview]:
    _require_little_endian()
    data = memoryview(data).cast("B")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise WireError(f"too short: {len(data)} bytes, a message starts with {_PREFIX.size}")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported version {version}, expected {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES}")
    if _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} runs past the end of a {len(data)}-byte message")
    header = _parse_header(bytes(data[_PREFIX.size:_PREFIX.size + header_len]))
    return data, header, data[_PREFIX.size + header_len:]


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"meta", "tensors"}:
        raise WireError('header must be a JSON object with exactly the keys "meta" and "tensors"')
    if not isinstance(header["meta"], dict):
        raise WireError(f"meta must be a JSON object, got {type(header['meta']).__name__}")
    if not isinstance(header["tensors"], list):
        raise WireError(f"tensors must be a JSON list, got {type(header['tensors']).__name__}")
    return header


def _check_entry(i: int, entry: Any) -> tuple[str, torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise WireError(f"tensor entry {i} must be an object with keys {sorted(_ENTRY_KEYS)}")
    name, dtype_name, shape = entry["name"], entry["dtype"], entry["shape"]
    offset, nbytes = entry["offset"], entry["nbytes"]
    if not isinstance(name, str):
        raise WireError(f"tensor entry {i}: name must be a string")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise WireError(f"tensor {name!r}: unknown dtype {dtype_name!r}, allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise WireError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise WireError(f"tensor {name!r}: shape {shape} is huge, over {MAX_ELEMENTS} elements")
    if not _is_count(offset) or not _is_count(nbytes):
        raise WireError(f"tensor {name!r}: offset and nbytes must be non-negative integers")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise WireError(f"tensor {name!r}: nbytes {nbytes} but shape {shape} of {dtype_name} needs {expected}")
    return name, dtype, shape, offset, nbytes


def _is_count(x: Any) -> bool:
    # JSON true/false arrive as Python bools, which are ints; refuse them.
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor(raw: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    # A bytearray copy: the tensor owns and may write its memory.
    buffer = bytearray(raw)
    if dtype == torch.bool:
        # Bytes other than 0 and 1 are not valid torch bools; normalise them.
        return torch.frombuffer(buffer, dtype=torch.uint8).ne(0).reshape(shape)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("the wire format is little-endian; this host is big-endian")
