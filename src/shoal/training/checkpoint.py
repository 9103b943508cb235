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
import threading
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


class LatestSaver:
    """Writes checkpoints to one path on its own thread, newest first: a
    snapshot handed over while an older one waits replaces it, so the caller
    (a parameter shard holding its lock) never waits for the disk. The caller
    must hand over a snapshot it will not modify (cloned tensors)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cond = threading.Condition()
        self.pending: dict[str, Any] | None = None
        self.writing = False
        self.thread: threading.Thread | None = None

    def submit(self, state: dict[str, Any]) -> None:
        with self.cond:
            self.pending = state
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shoal-checkpoint", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def flush(self) -> None:
        """Return once every snapshot handed over so far is on disk (or dropped for a newer one)."""
        with self.cond:
            self.cond.wait_for(lambda: self.pending is None and not self.writing)

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending is not None)
                state, self.pending, self.writing = self.pending, None, True
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(self.path, state)
            finally:
                with self.cond:
                    self.writing = False
                    self.cond.notify_all()


def checkpoint_file(path: str | Path) -> Path:
    """A run directory's checkpoint, or ``path`` itself when it is a file."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_weights(model: torch.nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load the model weights of a shoal checkpoint (or a run directory's) into ``model``;
    a checkpoint of another model is a ``ValueError`` naming what differs."""
    saved = load_checkpoint(checkpoint_file(path))
    weights = saved.get("model") if isinstance(saved, dict) else None
    if weights is None:
        raise ValueError(f"{path}: the checkpoint holds no model weights")
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    resized = [f"{k} {tuple(weights[k].shape)} here {tuple(own[k].shape)}" for k in own
               if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or resized:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"not in the model {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(resized[:3])}" if resized else "",
        ]))
        raise ValueError(f"{path}: the checkpoint is of another model than {type(model).__name__} ({details})")
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
