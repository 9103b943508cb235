"""Atomic, checksummed checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed to
disk, then renamed over the old one, so a crash leaves either the previous
checkpoint or the new one, never a torn file. The first line holds a SHA-256 of
the payload; a file whose payload does not match is refused, not loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

MAGIC = b"SHOAL-CHECKPOINT-1"


class CorruptCheckpoint(RuntimeError):
    pass


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + b" " + digest + b"\n")
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = path.read_bytes()
    header, newline, payload = data.partition(b"\n")
    parts = header.split(b" ")
    if not newline or len(parts) != 2 or parts[0] != MAGIC:
        raise CorruptCheckpoint(f"{path}: not a shoal checkpoint")
    if hashlib.sha256(payload).hexdigest().encode() != parts[1]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch, the file is damaged")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
