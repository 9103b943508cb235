"""A federated run's summary (what ``OUT/summary.json`` holds) as the table ``shoal fl simulate``
and ``shoal fl server`` print."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from shoal.metrics.report import format_bytes


def summary_table(summary: dict[str, Any]) -> Table:
    """A federated run's summary.json as a two-column table."""
    table = Table(title=f"shoal federated run: {summary['out']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    target = summary["target_accuracy"]
    reached = summary["rounds_to_target"]
    rows = [
        ("final test accuracy", f"{summary['final_accuracy']:.4f}"),
        ("best test accuracy", f"{summary['best_accuracy']:.4f}"),
        ("target accuracy", "-" if target is None else f"{target:.4f}"),
        ("rounds to target", "not reached" if reached is None
         else f"{reached} ({summary['time_to_target_s']:.1f} s)"),
        ("rounds", str(summary["rounds"])),
        ("clients", str(summary["clients"])),
        ("taking part per round", _taking_part(summary)),
        ("strategy / partition / codec", f"{summary['strategy']} / {summary['partition']} / {summary['codec']}"),
        ("model (parameters)", f"{summary['model']} ({summary['parameters']:,})"),
        ("uplink / downlink", f"{format_bytes(summary['uplink_bytes'])} / {format_bytes(summary['downlink_bytes'])}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("peak memory", _peak_memory(summary)),
    ]
    privacy, local = summary.get("privacy"), summary.get("local_privacy")
    if privacy:
        budget = "" if privacy.get("target_epsilon") is None else f" of {privacy['target_epsilon']:g}"
        rows.append(("client-level DP (epsilon, delta)", f"{privacy['epsilon']:.3g}{budget}, {privacy['delta']:g}"))
    if local:
        budget = "" if local.get("target_epsilon") is None else f" of {local['target_epsilon']:g}"
        rows.append(("local DP-SGD (worst client's epsilon)", f"{local['max_epsilon']:.3g}{budget}, "
                     f"{local['delta']:g}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _peak_memory(summary: dict[str, Any]) -> str:
    """This process's peak RSS, and the largest worker's beside it under fl simulate's worker processes."""
    mine, workers = format_bytes(summary["peak_memory_bytes"]), summary.get("worker_peak_memory_bytes")
    if workers is None:
        return mine
    # A worker's RSS counts the pages it still shares with this process (copy-on-write), so the sum overstates.
    return f"{mine}; {summary['processes']} workers <= {format_bytes(workers)} each"


def _taking_part(summary: dict[str, Any]) -> str:
    """Clients aggregated per round on average, against the configured number a round."""
    mean = summary.get("mean_participants")  # absent from summaries written before it was counted
    asked = summary["clients_per_round"]
    return f"{asked} asked" if mean is None else f"{mean:.3g} of {asked} asked"
