"""A training run's summary (what ``OUT/summary.json`` holds) as the table ``shoal train`` prints,
and the one way shoal's tables write a byte count."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def format_bytes(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (powers of 1000, up to TB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def format_metric(value: float | None) -> str:
    """A test metric: four decimals (``0.9731``), or three significant digits when that would show
    nothing (an mse of ``0.000123``)."""
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


def summary_table(summary: dict[str, Any]) -> Table:
    """The run's summary.json as a two-column table, led by the task's main metric."""
    table = Table(title=f"shoal run: {summary['out']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    ttt = summary["time_to_target_s"]
    # A summary.json from before tasks: classification's accuracy fields alone.
    metric = summary.get("metric", "accuracy")
    final = summary.get("final_metric", summary.get("final_accuracy"))
    best = summary.get("best_metric", summary.get("best_accuracy"))
    target = summary.get("target", summary.get("target_accuracy"))
    best_step = f" (step {summary['best_step']})" if summary.get("best_step") is not None else ""
    rows = [
        (f"final test {metric}", format_metric(final)),
        (f"best test {metric}", format_metric(best) + best_step),
        (f"target {metric}", format_metric(target)),
        ("time to target", "not reached" if ttt is None else f"{ttt:.1f} s (step {summary['steps_to_target']})"),
        ("steps", str(summary["steps"])),
        ("workers", str(summary["workers"])),
        ("strategy / codec", f"{summary['strategy']} / {summary['codec']}"
         + (f" -> {summary['codec_chosen']}" if summary.get("codec_chosen") else "")),
        ("model (parameters)", f"{summary['model']} ({summary['parameters']:,})"),
        ("training time", f"{summary['train_time_s']:.1f} s"),
        ("wall time (after setup)", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:,.0f} samples/s"),
        ("wire bytes per worker", format_bytes(summary["wire_bytes_per_worker"])),
        ("fp32 all-reduce would send", format_bytes(summary["dense_bytes_per_worker"])),
    ]
    if summary.get("stopped_early_at_step") is not None:
        rows.append(("stopped early", f"after step {summary['stopped_early_at_step']} (no improvement)"))
    if summary.get("best_checkpoint"):
        rows.append(("best weights", summary["best_checkpoint"]))
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    privacy = summary.get("privacy")
    if privacy:
        budget = f" of {privacy['target_epsilon']:g}" if privacy.get("target_epsilon") is not None else ""
        rows.append(("privacy (epsilon, delta)", f"{privacy['epsilon']:.3g}{budget}, {privacy['delta']:g} "
                     f"({privacy['accountant'].upper()})"))
        rows.append(("noise multiplier / clip", f"{privacy['noise_multiplier']:.4g} / {privacy['clip']:g}"))
        if privacy.get("stopped_by_budget"):
            rows.append(("stopped by budget", f"after step {privacy['steps']}: the next would pass target_epsilon"))
    for name, value in rows:
        table.add_row(name, value)
    return table
