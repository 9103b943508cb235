"""``metrics.jsonl``: one JSON object per logged step, appended and flushed as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: str | Path, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        """Keep only lines up to ``step``: a resumed run rewrites what came after."""
        kept = [line for line in read_metrics(self.path) if line["step"] <= step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    lines = []
    for raw in Path(path).read_text().splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the readable log
    return lines
