"""``metrics.jsonl``: one JSON object per logged step, appended and flushed as training goes; and the
same scalars as TensorBoard event files in ``OUT/tensorboard/``, so that ``tensorboard --logdir runs``
shows every run under ``runs/``.

TensorBoard's x value is the record's ``round`` (a federated run) or ``step``; its tags are
:func:`tensorboard_tag` of the record's keys (``loss`` -> ``train/loss``, ``test_accuracy`` ->
``test/accuracy``, ``wire_bytes`` -> ``comm/wire_bytes``).
"""

from __future__ import annotations

import json
from numbers import Real
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"

# TensorBoard sections (a tag's part before "/") by record key; ``test_*`` keys go to ``test/``, and
# a key named nowhere here (loss, lr, staleness, what a new strategy logs) to ``train/``.
_SECTIONS = {
    "time": ("time_s", "wall_s", "compute_s", "slowdown_s"),
    "comm": ("comm_s", "wire_bytes", "dense_bytes", "uplink_bytes", "downlink_bytes", "uplink_bytes_total",
             "downlink_bytes_total"),
    "clients": ("participating", "selected", "dropped", "late", "rejected", "aggregated"),
}
_SECTION_OF = {key: section for section, keys in _SECTIONS.items() for key in keys}
_X_KEYS = ("step", "round")


class MetricsWriter:
    """Writes ``path`` (metrics.jsonl) and, unless ``tensorboard`` is false, event files in the
    ``tensorboard/`` folder beside it. A fresh run (``resume_step`` None) starts both anew; a resumed
    one keeps what was logged up to ``resume_step`` and appends."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", buffering=1)
        self._board = _EventLog(self.path.parent / TENSORBOARD_DIR, resume_step) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """Keep only lines up to ``step``: a resumed run rewrites what came after."""
        kept = [line for line in read_metrics(self.path) if line["step"] <= step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        if self._board is not None:
            self._board.write(record)

    def close(self) -> None:
        self._fh.close()
        if self._board is not None:
            self._board.close()


class _EventLog:
    """``OUT/tensorboard/``: each metrics.jsonl record as one TensorBoard event."""

    def __init__(self, folder: Path, resume_step: int | None):
        # Imported here, not with the module: `shoal runs compare` reads metrics.jsonl through it, without torch.
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None:  # a fresh run in an old OUT: the old run's points would mix with the new
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        # A resumed run keeps the points up to resume_step (as metrics.jsonl does) and hides, in the
        # earlier event files, those logged after it by the run that stopped.
        purge_step = None if resume_step is None else resume_step + 1
        # Flushed every 10 s rather than TensorBoard's 120 s, so that a live run's curves keep up.
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step, flush_secs=10)
        self._summary = Summary

    def write(self, record: dict[str, Any]) -> None:
        # One event holding all the record's scalars, through SummaryWriter's file writer. Each event
        # costs rank 0 Python time (the writer thread checksums it in pure Python, holding the GIL),
        # which the other workers wait for at the next collective: measured on this project's CPU
        # runner, ten add_scalar calls (an event each) about 0.45 ms a record, one event about 0.1 ms.
        values = [self._summary.Value(tag=tag, simple_value=value) for tag, value in tensorboard_scalars(record)]
        self._writer._get_file_writer().add_summary(self._summary(value=values), record.get("round", record["step"]))

    def close(self) -> None:
        self._writer.close()  # flushes what is queued


def preload_tensorboard() -> None:
    """Import what the event files need (a second or more of CPU). The training loop calls this
    on rank 0 while it builds, before the workers start together: opening the writer later, after
    the start barrier, would hold rank 0 back while the others train (under a parameter server,
    rank 1 then pushed dense gradients before rank 0's masks reached the servers)."""
    from tensorboard.compat.proto import summary_pb2  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401


def tensorboard_tag(key: str) -> str:
    """A record key's TensorBoard tag: ``section/name``."""
    if key.startswith("test_"):
        return f"test/{key.removeprefix('test_')}"
    return f"{_SECTION_OF.get(key, 'train')}/{key.removeprefix('train_')}"


def tensorboard_scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """Every scalar of a metrics.jsonl record as (tag, value): numbers and flags (a bool is a Real:
    0 or 1), not the x value (step, round), nor lists (which clients dropped) or text."""
    return [(tensorboard_tag(key), float(value)) for key, value in record.items()
            if key not in _X_KEYS and isinstance(value, Real)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    lines = []
    for raw in Path(path).read_text().splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the readable log
    return lines
