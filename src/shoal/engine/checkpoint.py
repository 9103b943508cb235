"""Atomic, checksummed checkpoints.

A checkpoint is written to a temporary file in the same directory, flushed to
disk, then renamed over the old one, so a crash leaves either the previous
checkpoint or the new one, never a torn file. The first line holds a SHA-256 of
the payload; a file whose payload does not match is refused, not loaded.

The checksum detects damage, not tampering: anyone can write a valid one. So
the payload is read as tensors and plain values only (``torch.load`` with
``weights_only=True``, which is all shoal writes); a pickle that would build
any other object, and so could run code, is refused with the file named.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
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
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError) as err:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        what = f"it would build {found[1]}" if found else "it holds more than tensors and plain values"
        raise CorruptCheckpoint(
            f"{path}: refused: {what}, and loading that could run code. shoal checkpoints hold tensors and "
            "plain values only: this file was made elsewhere or altered") from None


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


class WrongModel(ValueError):
    """A checkpoint of another model; ``differences`` says what differs."""

    def __init__(self, file: Path, differences: str):
        super().__init__(f"{file}: the checkpoint is of another model: {differences}")
        self.file, self.differences = file, differences


def mismatches(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``saved`` from loading into a model whose state is ``expected``, one line each."""
    problems = [f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here"
                for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k} missing" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    return problems


def load_weights(model: torch.nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load the model weights of a shoal checkpoint (or a run directory's) into ``model``.

    A damaged file is :class:`CorruptCheckpoint`; one without weights, or of
    another model (the message says what differs), a ``ValueError``."""
    file = checkpoint_file(path)
    saved = load_checkpoint(file)
    weights = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{file}: holds no model weights")
    problems = mismatches(model.state_dict(), weights)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise WrongModel(file, "; ".join(problems[:3]) + more)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
