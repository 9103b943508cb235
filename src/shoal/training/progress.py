"""Rank 0's view of training on the console: a rich progress bar, and one
printed line per evaluation."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """Rank 0's progress bar and one printed line per evaluation."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.console = Console()
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", acc="-")

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def advance(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def evaluated(self, step: int, loss: float, acc: float, clock: float) -> None:
        self.bar.update(self.task, acc=f"{acc:.4f}")
        if self.enabled:
            self.console.print(f"step {step:>6}  test loss {loss:.4f}  test acc {acc:.4f}  {clock:7.1f}s")
