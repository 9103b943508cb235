"""The printed tables of a :class:`~shoal.compress.run.CompressReport` and a
:class:`~shoal.compress.budget.BudgetReport`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from shoal.compress.budget import BUDGET, BudgetReport
from shoal.compress.run import CompressReport


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1000
    return str(n)


def print_report(report: CompressReport, console: Console) -> None:
    """One row per model; each value beside its ratio to the uncompressed model's."""
    base = report.rows[0]
    table = Table(title=f"shoal compress: {report.model} on {report.dataset}, ONNX Runtime "
                        f"{report.threads} thread{'s' if report.threads > 1 else ''}, median of {report.repeats} runs")
    for column in ("model", "artefact", "non-zero params", "latency b=1", "latency b=32", "test accuracy",
                   "max |diff|"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for row in report.rows:
        table.add_row(
            row.name,
            f"{_size(row.artefact_bytes)} {base.artefact_bytes / row.artefact_bytes:.1f}x",
            f"{row.nonzero_parameters:,}",
            f"{row.latency_ms_batch1:.3f} ms {base.latency_ms_batch1 / row.latency_ms_batch1:.2f}x",
            f"{row.latency_ms_batch32:.3f} ms {base.latency_ms_batch32 / row.latency_ms_batch32:.2f}x",
            f"{row.accuracy:.4f} {(row.accuracy - base.accuracy) * 100:+.1f}pt",
            f"{row.max_abs_diff:.1e}",
        )
    console.print(table)
    lines = [f"{row.name}: {row.spec}; {row.artefact}" + (f", {row.onnx}" if row.onnx != row.artefact else "")
             for row in report.rows]
    lines += [
        "ratios: the uncompressed model's size or latency over the row's (higher is better); accuracy is "
        "measured in ONNX Runtime on the whole test set; max |diff|: its logits against the PyTorch model "
        "the row was made from",
        f"artefact round trip: max |restored - pruned| = {report.artefact_max_abs_diff:.1e}",
        *([_finetuned(report.finetune)] if report.finetune else []),
        f"wrote {report.out}/report.json",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def print_budget(report: BudgetReport, console: Console) -> None:
    """Every candidate the budget search measured, the winner in bold, then where it is."""
    table = Table(title="shoal compress: candidates tried (latency: ONNX Runtime, batch 32, median)")
    for column in ("candidate", "size", "latency b=32", "accuracy", "within budget"):
        table.add_column(column, justify="left" if column == "candidate" else "right", no_wrap=True)
    for c in report.candidates:
        table.add_row(c.label, f"{c.size_bytes / 1000:,.1f} KB", f"{c.latency_ms_batch32:.3f} ms", f"{c.accuracy:.4f}",
                      "yes" if c.within else "no", style="bold" if c == report.winner else None)
    console.print(table)
    winner = report.winner
    console.print(f"winner: {winner.label} ({winner.spec}): {winner.file}; wrote {Path(report.out) / BUDGET}",
                  highlight=False, markup=False, soft_wrap=True)


def _finetuned(run: dict) -> str:
    sent = run["wire_bytes_per_worker"] / run["dense_bytes_per_worker"] if run["dense_bytes_per_worker"] else None
    return (f"fine-tuned {run['steps']} steps on {run['workers']} worker(s) ({run['strategy']}"
            + (f", {run['schedule']} sparsity {run['sparsity']:.3f}" if run["schedule"] else "")
            + f"): test accuracy {run['accuracy']:.4f}"
            + (f", gradients sent {sent:.0%} of dense" if sent is not None and run["workers"] > 1 else "")
            + f"; run in {run['run']}")
