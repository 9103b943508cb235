"""``shoal runs compare``: finished runs side by side, from what each left in its OUT.

1. :func:`load_runs` reads each directory's summary.json and metrics.jsonl (a ``shoal train`` run,
   counted in steps, or a ``shoal fl`` run, counted in rounds).
2. :func:`pick_metric` settles the one test metric they are compared on.
3. :func:`compare_table` is their summaries as one table, a column per run;
   :func:`plot_runs` their curves (test metric and training loss) overlaid in one figure.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from shoal.metrics.report import format_bytes  # noqa: E402
from shoal.metrics.writer import read_metrics  # noqa: E402

MISSING = "–"  # a figure this run's summary.json does not hold
DEFAULT_METRIC = "accuracy"  # what a summary.json without a ``metric`` field measured


class RunError(ValueError):
    """A directory that cannot be compared; the message names it."""


@dataclass(frozen=True)
class FinishedRun:
    label: str  # the plot's legend and the table's column header
    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl

    @property
    def federated(self) -> bool:
        return "rounds" in self.summary

    @property
    def metric(self) -> str:
        return str(self.summary.get("metric", DEFAULT_METRIC))

    @property
    def x_key(self) -> str:
        return "round" if self.federated else "step"

    def figure(self, which: str, metric: str) -> Any:
        """The summary's ``final``, ``best`` or ``target`` value of ``metric``: ``final_metric``,
        ``best_metric``, ``target`` where the summary names ``metric`` as its main one; else
        ``final_accuracy`` and the like (classification's fields, and summaries from before tasks),
        or ``final_metrics[metric]``."""
        if self.metric == metric:
            value = self.summary.get({"final": "final_metric", "best": "best_metric", "target": "target"}[which])
            if value is not None:
                return value
        value = self.summary.get(f"{which}_{metric}")
        finals = self.summary.get("final_metrics")
        if value is None and which == "final" and isinstance(finals, dict):
            value = finals.get(metric)
        return value


def load_runs(dirs: Sequence[str | Path]) -> list[FinishedRun]:
    """Each directory's summary.json and metrics.jsonl; :class:`RunError` names the first that lacks
    either or whose summary.json is not a JSON object."""
    paths = [Path(d) for d in dirs]
    runs = []
    for path, label in zip(paths, _labels(paths)):
        for name in ("summary.json", "metrics.jsonl"):
            if not (path / name).is_file():
                raise RunError(f"{path}: no {name} there (not the OUT of a finished shoal train or shoal fl run)")
        try:
            summary = json.loads((path / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{path}: summary.json is not JSON ({err})") from None
        if not isinstance(summary, dict):
            raise RunError(f"{path}: summary.json is not a JSON object")
        runs.append(FinishedRun(label, path, summary, read_metrics(path / "metrics.jsonl")))
    return runs


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name; where runs share one, as many of their paths' last parts as tell
    them apart."""
    full = [p.resolve() for p in paths]  # "." has a name too
    labels = [p.name for p in full]
    for depth in range(2, max(len(p.parts) for p in full) + 1):
        shared = {label for label, n in Counter(labels).items() if n > 1}
        if not shared:
            break
        labels = [str(Path(*p.parts[-depth:])) if label in shared else label for p, label in zip(full, labels)]
    return labels


def pick_metric(runs: Sequence[FinishedRun], metric: str | None = None) -> str:
    """``metric`` (``accuracy`` or ``test_accuracy``) if given, else what the runs' summaries say
    they measured (accuracy where they do not say). :class:`RunError` if the runs measured
    different ones and none was given, or if no run recorded the one given."""
    if metric is None:
        measured = sorted({run.metric for run in runs})
        if len(measured) > 1:
            raise RunError(f"the runs measured different metrics ({', '.join(measured)}): pick one with --metric")
        return measured[0]
    metric = metric.removeprefix("test_")
    if not any(run.figure("final", metric) is not None or any(f"test_{metric}" in r for r in run.records)
               for run in runs):
        recorded = sorted({key.removeprefix("test_") for run in runs for r in run.records for key in r
                           if key.startswith("test_")})
        raise RunError(f"--metric {metric}: no run recorded it (they recorded: {', '.join(recorded) or 'none'})")
    return metric


def compare_table(runs: Sequence[FinishedRun], metric: str) -> Table:
    """One row per figure, one column per run; a row no run has a value for is left out. Cells wrap
    rather than being cut, so the table reads at 80 columns."""
    table = Table(title=f"runs compared on test {metric}")
    table.add_column("", style="bold", no_wrap=True)  # row names are short: each stays on one line
    for run in runs:
        table.add_column(run.label, justify="right", overflow="fold")
    for name, cell in _rows(metric):
        cells = [cell(run) for run in runs]
        if any(c is not None for c in cells):
            table.add_row(name, *(MISSING if c is None else c for c in cells))
    return table


Cell = Callable[[FinishedRun], "str | None"]


def _rows(metric: str) -> list[tuple[str, Cell]]:
    def field(key: str, fmt: Callable[[Any], str] = str) -> Cell:
        return lambda run: None if run.summary.get(key) is None else _format(run.summary[key], fmt)

    def of_metric(which: str) -> Cell:
        def cell(run: FinishedRun) -> str | None:
            value = run.figure(which, metric)
            return None if value is None else _format(value, "{:.4f}".format)

        return cell

    seconds, count = "{:,.1f} s".format, "{:,}".format
    return [
        ("kind", lambda run: "federated" if run.federated else "train"),
        ("task", field("task")),
        ("model", field("model")),
        ("dataset", field("dataset")),
        ("strategy", field("strategy")),
        ("partition", field("partition")),
        ("codec", _codec),
        ("workers", field("workers")),
        ("clients", _clients),
        ("steps", field("steps", count)),
        ("rounds", field("rounds", count)),
        (f"final {metric}", of_metric("final")),
        (f"best {metric}", of_metric("best")),
        *([("final test loss", field("final_loss", "{:.4f}".format))] if metric != "loss" else []),
        (f"target {metric}", of_metric("target")),
        ("time to target", _time_to_target(metric)),
        ("wall time", field("wall_time_s", seconds)),
        ("samples/s", field("samples_per_s", "{:,.0f}".format)),
        ("wire bytes / worker", field("wire_bytes_per_worker", format_bytes)),
        ("uplink bytes", field("uplink_bytes", format_bytes)),
        ("downlink bytes", field("downlink_bytes", format_bytes)),
    ]


def _format(value: Any, fmt: Callable[[Any], str]) -> str:
    """``fmt(value)``, or the value as it is where summary.json holds something ``fmt`` cannot take."""
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


def _codec(run: FinishedRun) -> str | None:
    codec, chosen = run.summary.get("codec"), run.summary.get("codec_chosen")
    return None if codec is None else f"{codec} -> {chosen}" if chosen else str(codec)


def _clients(run: FinishedRun) -> str | None:
    clients, per_round = run.summary.get("clients"), run.summary.get("clients_per_round")
    return None if clients is None else f"{per_round} of {clients} a round"


def _time_to_target(metric: str) -> Cell:
    def cell(run: FinishedRun) -> str | None:
        if run.figure("target", metric) is None:
            return None
        seconds = run.summary.get("time_to_target_s")
        at = run.summary.get(f"{run.x_key}s_to_target")
        return "not reached" if seconds is None else _format(seconds, f"{{:,.1f}} s ({run.x_key} {at})".format)

    return cell


def plot_runs(runs: Sequence[FinishedRun], metric: str, out_path: str | Path) -> None:
    """The runs' test ``metric`` and training loss against step (or round), one line per run, in one
    figure at ``out_path`` (written whole or not at all)."""
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    losses = []
    for run in runs:
        logged = [r for r in run.records if run.x_key in r]
        evals = [(r[run.x_key], r[f"test_{metric}"]) for r in logged if f"test_{metric}" in r]
        train = [(r[run.x_key], r["loss"]) for r in logged if "loss" in r]
        if evals:
            ax_metric.plot(*zip(*evals), marker="o", ms=3, label=run.label)
        if train:
            ax_loss.plot(*zip(*train), lw=0.8, label=run.label)
            losses += [loss for _, loss in train]
    x_label = " / ".join(sorted({run.x_key for run in runs}, reverse=True))  # step, round or step / round
    ax_metric.set(xlabel=x_label, ylabel=f"test {metric}", title=f"test {metric}")
    if metric == "accuracy":
        ax_metric.set_ylim(0, 1)
    ax_loss.set(xlabel=x_label, ylabel="loss", title="training loss")
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    for ax in (ax_metric, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
