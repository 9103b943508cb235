"""Byte-level language-model data: Python's own standard-library source, or a user's text.

1. Read bytes, at most ``bytes`` of them, from the ``.py`` files of
   ``sysconfig.get_paths()["stdlib"]`` (or, with ``path=``, from a user's file,
   or the files matching ``pattern`` under a user's directory). A directory is
   read in a fixed order: its own files sorted by name, then its
   subdirectories, sorted, the same way; so every worker of a run reads the
   same bytes, in a few milliseconds, and no cache is needed.
2. Split by position: the last ``test_fraction`` of the bytes is the test set.
3. Cut each part into non-overlapping windows of ``seq_len`` bytes; a window's
   targets are the same bytes shifted by one (the next byte at every
   position). A part's last target byte lies inside that part, so the train
   and test sets share no byte.

Nothing is downloaded: the standard library ships with every Python. Its
installed packages (``site-packages``) and its test suites are skipped, so the
text is the same however many packages are installed and whether or not the
distribution ships ``test``.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import TensorDataset

from shoal.data.base import DatasetBundle
from shoal.registry import DATASETS

VOCAB = 256  # one token per byte value

# Standard-library directories that are not the library itself, or differ between installs.
_SKIPPED_IN_STDLIB = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(2_000_000, ge=1024, description="at most this many bytes of text in all (train and test)")
    seq_len: int = Field(128, ge=1, le=65536, description="bytes per sample")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="the last fraction of the text, held out")
    path: str | None = Field(None, description="your own text file or directory instead of the standard library")
    pattern: str = Field("*.py", min_length=1, description="which files of a directory to read")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().exists():
            raise ValueError(f"{value!r} is no file or directory")
        return value


@DATASETS.register("text", TextOptions)
def text(options: TextOptions) -> DatasetBundle:
    """Bytes of the standard library's source, or your own text, and the next byte (task: language_model)."""
    tokens = torch.from_numpy(np.frombuffer(source_bytes(options), dtype=np.uint8).astype(np.int64))
    if len(tokens) == 0:
        raise ValueError(f"dataset 'text': no text in {options.path or 'the standard library'} "
                         f"(files matching {options.pattern!r})")
    split = round(len(tokens) * (1 - options.test_fraction))
    train, test = byte_windows(tokens[:split], options.seq_len), byte_windows(tokens[split:], options.seq_len)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset 'text': {len(tokens)} bytes make {len(train)} train and {len(test)} test "
                         f"windows of seq_len={options.seq_len}; raise bytes or test_fraction, or lower seq_len")
    return DatasetBundle(train, test, (options.seq_len,), VOCAB)


def source_bytes(options: TextOptions) -> bytes:
    """The whole text, before the split: step 1 above."""
    if options.path is None:
        return read_text_bytes(Path(sysconfig.get_paths()["stdlib"]), options.pattern, options.bytes,
                               skip=_SKIPPED_IN_STDLIB)
    return read_text_bytes(Path(options.path).expanduser(), options.pattern, options.bytes)


def read_text_bytes(root: Path, pattern: str, limit: int, *, skip: frozenset[str] = frozenset()) -> bytes:
    """The first ``limit`` bytes of ``root`` (a file), or of the files under
    ``root`` matching ``pattern``, concatenated in the order of step 1 above,
    leaving out directories named in ``skip``."""
    if root.is_file():
        with root.open("rb") as f:
            return f.read(limit)
    chunks, total = [], 0
    for path in _files_in_order(root, pattern, skip):
        with path.open("rb") as f:
            chunk = f.read(limit - total)
        chunks.append(chunk)
        total += len(chunk)
        if total >= limit:
            break
    return b"".join(chunks)


def _files_in_order(root: Path, pattern: str, skip: frozenset[str]) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        # os.walk descends into subdirs in the order this list is left in.
        subdirs[:] = sorted(d for d in subdirs if d not in skip)
        for name in sorted(fnmatch.filter(files, pattern)):
            path = Path(directory, name)
            if path.is_file():  # not a dangling link
                yield path


def byte_windows(tokens: torch.Tensor, seq_len: int) -> TensorDataset:
    """``(inputs, targets)``, each ``[n, seq_len]``: window i is
    ``tokens[i*L : (i+1)*L]`` and its targets ``tokens[i*L+1 : (i+1)*L+1]``."""
    n = max(0, (len(tokens) - 1) // seq_len)
    used = tokens[: n * seq_len + 1]
    # Views of one tensor: the targets share the inputs' storage.
    return TensorDataset(used[:-1].reshape(n, seq_len), used[1:].reshape(n, seq_len))
