"""Rank 0's view of training on the console: a rich progress bar, and one
printed line per evaluation."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shoal.metrics.report import format_metric


class TrainProgress:
    """Rank 0's progress bar and one printed line per evaluation."""

    def __init__(self, enabled: bool, total: int, start: int, *, metric: str = "accuracy"):
        self.console = Console()
        self.enabled = enabled
        self.metric = metric  # the task's main metric
        short = "acc" if metric == "accuracy" else metric
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"loss {{task.fields[loss]}}  {short} {{task.fields[main]}}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", main="-")

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def advance(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def evaluated(self, step: int, metrics: dict[str, float], clock: float) -> None:
        """An evaluation's test loss and main metric."""
        value = format_metric(metrics[self.metric])
        self.bar.update(self.task, main=value)
        if self.enabled:
            self.console.print(f"step {step:>6}  test loss {metrics['loss']:.4f}  test {self.metric} {value}  "
                               f"{clock:7.1f}s")

    def note(self, line: str) -> None:
        """One printed line (why the run stops)."""
        if self.enabled:
            self.console.print(line, highlight=False)
