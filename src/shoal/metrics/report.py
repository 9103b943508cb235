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


def summary_table(summary: dict[str, Any]) -> Table:
    """The run's summary.json as a two-column table."""
    table = Table(title=f"shoal run: {summary['out']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    ttt = summary["time_to_target_s"]
    rows = [
        ("final test accuracy", f"{summary['final_accuracy']:.4f}"),
        ("best test accuracy", f"{summary['best_accuracy']:.4f}"),
        ("target accuracy", "-" if summary["target_accuracy"] is None else f"{summary['target_accuracy']:.4f}"),
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
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    for name, value in rows:
        table.add_row(name, value)
    return table
