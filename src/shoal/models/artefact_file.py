"""The compact sparse artefact: a pruned model stored by its non-zeros.

Layout (every byte after the first line is one LZMA stream, so the masks and
values are entropy-coded together, as in Deep Compression, Han et al. 2016)::

    SHOAL-SPARSE-1\\n
    lzma( u32 header length | header JSON | tensor records ... )

The header names the model spec, input shape and classes (so the loader can
build the architecture), the value coding, and each tensor's name, shape and
coding. Per tensor, in state-dict order:

- ``mask`` coding: the keep-mask bit-packed (1 bit per entry), then the
  non-zero values only; chosen when the zeros' value bytes outweigh the mask's
  ``numel / 8`` bytes. ``dense`` coding: all values.
- Values of weight matrices and kernels: ``fp32`` (exact), or ``int8`` with
  a float32 scale per output channel (``scale=channel``) or per tensor,
  ``q = round(w / s)``, ``s = max|w| / 127``. Other floating tensors (biases,
  norm parameters, running statistics) stay fp32; integer buffers raw.

Pruned channels are no special case: each tensor's stored shape is its real
shape, and :func:`shoal.models.artefact.load_artefact` resizes the freshly built model to it.

``shoal compress`` writes these files and ``model: artefact`` reads them. The
format lives in models, below compress, so that reading an artefact never
imports compress (which builds models).
"""

from __future__ import annotations

import json
import os
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shoal.models.artefact_header import MAX_HEADER_BYTES, parse_header

MAGIC = b"SHOAL-SPARSE-1\n"


class CompressError(ValueError):
    """Input that cannot be compressed (bad spec, a checkpoint that does not fit
    the config) or an artefact that cannot be read; the message says what and
    where. The CLI exits with code 2.

    Users catch it as :class:`shoal.compress.CompressError`, the same class: it
    is defined here, with the file format, because artefact readers raise it and
    models sits below compress, which must not be imported from here."""


class ArtefactOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    values: Literal["fp32", "int8"] = Field("fp32", description="coding of the weights' non-zero values")
    scale: Literal["channel", "tensor"] = Field("channel", description="int8: one scale per output channel or tensor")
    codec: Literal["lzma", "zlib"] = Field("lzma", description="entropy coder over the whole record stream")


def encode_tensor(tensor: torch.Tensor, *, values: str, scale: str) -> tuple[dict[str, Any], bytes]:
    """One tensor -> (header record, bytes). Pure: no file, no model."""
    array = tensor.detach().cpu().contiguous().numpy()
    record: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.dtype != np.float32:
        record["coding"] = "raw"
        return record, array.tobytes()
    flat = array.reshape(-1)
    mask = flat != 0
    quantise = values == "int8" and array.ndim >= 2
    value_bytes = 1 if quantise else 4
    use_mask = (flat.size - int(mask.sum())) * value_bytes > (flat.size + 7) // 8
    record.update(coding="mask" if use_mask else "dense", values="int8" if quantise else "fp32",
                  nnz=int(mask.sum()))
    parts = [np.packbits(mask).tobytes()] if use_mask else []
    if quantise:
        rows = array.reshape(array.shape[0], -1) if scale == "channel" else array.reshape(1, -1)
        peak = np.abs(rows).max(axis=1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8).reshape(-1)
        record["scales"] = len(scales)
        parts += [scales.tobytes(), (q[mask] if use_mask else q).tobytes()]
    else:
        parts.append((flat[mask] if use_mask else flat).tobytes())
    return record, b"".join(parts)


def decode_tensor(record: dict[str, Any], data: memoryview) -> tuple[torch.Tensor, int]:
    """Inverse of :func:`encode_tensor`: (tensor, bytes consumed)."""
    shape = tuple(record["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    dtype = np.dtype(record["dtype"])
    if record["coding"] == "raw":
        size = numel * dtype.itemsize
        array = np.frombuffer(data[:size], dtype=dtype).copy()
        return torch.from_numpy(array.reshape(shape)), size
    pos = 0
    mask = None
    if record["coding"] == "mask":
        packed = (numel + 7) // 8
        mask = np.unpackbits(np.frombuffer(data[:packed], dtype=np.uint8), count=numel).astype(bool)
        pos = packed
    count = record["nnz"] if mask is not None else numel
    if record["values"] == "int8":
        scales = np.frombuffer(data[pos:pos + 4 * record["scales"]], dtype=np.float32)
        pos += 4 * record["scales"]
        stored = np.frombuffer(data[pos:pos + count], dtype=np.int8).astype(np.float32)
        pos += count
        per_row = numel // len(scales)
        row_scale = np.repeat(scales, per_row)
        flat = np.zeros(numel, dtype=np.float32)
        if mask is not None:
            flat[mask] = stored * row_scale[mask]
        else:
            flat = stored * row_scale
    else:
        stored = np.frombuffer(data[pos:pos + 4 * count], dtype=np.float32)
        pos += 4 * count
        flat = np.zeros(numel, dtype=np.float32)
        if mask is not None:
            flat[mask] = stored
        else:
            flat = stored.copy()
    return torch.from_numpy(flat.reshape(shape)), pos


def save_artefact(path: str | Path, model: nn.Module, *, model_spec: Any, input_shape: tuple[int, ...],
                  num_classes: int, options: ArtefactOptions | None = None) -> int:
    """Write ``model``'s state (and how to rebuild it) to ``path``; return the file's bytes."""
    options = options or ArtefactOptions()
    records, chunks = [], []
    for name, tensor in model.state_dict().items():
        record, blob = encode_tensor(tensor, values=options.values, scale=options.scale)
        records.append({"name": name, **record})
        chunks.append(blob)
    header = json.dumps({
        "model": model_spec, "input_shape": list(input_shape), "num_classes": num_classes,
        "values": options.values, "scale": options.scale, "codec": options.codec, "tensors": records,
    }, separators=(",", ":")).encode()
    body = b"".join([struct.pack("<I", len(header)), header, *chunks])
    packed = lzma.compress(body, preset=9 | lzma.PRESET_EXTREME) if options.codec == "lzma" else zlib.compress(body, 9)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(MAGIC + options.codec.encode() + b"\n" + packed)
    os.replace(tmp, path)  # a crash leaves the old artefact or the new one, never half of one
    return path.stat().st_size


# Decompressed, an artefact may be at most this large: a small file that inflates
# without end (a decompression bomb) is refused, not read into memory.
MAX_BODY_BYTES = 4 << 30


def read_artefact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, state dict)`` of an artefact file; its header is checked
    (:mod:`shoal.models.artefact_header`) before any tensor is decoded."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC):
        raise CompressError(f"{path}: not a shoal sparse artefact")
    codec, _, packed = raw[len(MAGIC):].partition(b"\n")
    if codec not in (b"lzma", b"zlib"):
        raise CompressError(f"{path}: unknown artefact coder {codec[:20]!r}")
    try:
        body = memoryview(_inflate(codec, packed))
    except (lzma.LZMAError, zlib.error, ValueError) as err:
        raise CompressError(f"{path}: damaged artefact ({err})") from None
    (size,) = struct.unpack("<I", body[:4]) if len(body) >= 4 else (len(body),)
    if not 0 < size <= min(MAX_HEADER_BYTES, len(body) - 4):
        raise CompressError(f"{path}: damaged artefact (header of {size} bytes in a body of {len(body)})")
    try:
        header = parse_header(bytes(body[4:4 + size]))
    except ValueError as err:
        raise CompressError(f"{path}: refused: {err}") from None
    pos, state = 4 + size, {}
    try:
        for record in header.tensors:
            tensor, used = decode_tensor(record.model_dump(exclude_none=True), body[pos:])
            state[record.name] = tensor
            pos += used
    except ValueError as err:  # a record promising more bytes than follow
        raise CompressError(f"{path}: damaged artefact ({err})") from None
    return header.model_dump(exclude_none=True), state


def _inflate(codec: bytes, packed: bytes) -> bytes:
    inflater = lzma.LZMADecompressor() if codec == b"lzma" else zlib.decompressobj()
    body = inflater.decompress(packed, MAX_BODY_BYTES)
    if not inflater.eof:
        raise ValueError(f"it is truncated or inflates past {MAX_BODY_BYTES:,} bytes")
    return body
