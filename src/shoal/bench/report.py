"""Plots and an HTML page for a benchmark's ``bench.json`` rows."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shoal.metrics.writer import read_metrics  # noqa: E402


def plot_accuracy(results: list[dict[str, Any]], out: Path, *, group: str = "rate",
                  title: str = "link {}", x: str = "time_s", xlabel: str = "training time (s)") -> list[Path]:
    """One PNG per value of ``group`` (the link rate): test accuracy against
    ``x`` (training time), a line per configuration."""
    paths = []
    for rate in dict.fromkeys(r[group] for r in results):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in results:
            if r[group] != rate or r["failed"] or not Path(r["metrics"]).is_file():
                continue
            points = [(m[x], m["test_accuracy"]) for m in read_metrics(r["metrics"]) if "test_accuracy" in m]
            if points:
                ax.plot(*zip(*points), marker=".", label=r["label"])
        ax.set(title=f"test accuracy against {xlabel.split(' (')[0]}, {title.format(rate)}", xlabel=xlabel,
               ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"accuracy-{re.sub(r'[^A-Za-z0-9._-]+', '-', str(rate))}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_bytes(results: list[dict[str, Any]], out: Path) -> Path:
    """Wire bytes per step and worker, per configuration (from the first rate that ran it)."""
    seen: dict[str, float] = {}
    for r in results:
        if not r["failed"] and r["label"] not in seen:
            seen[r["label"]] = r["wire_bytes_per_step"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(seen) + 1.5))
    labels = list(seen)
    ax.barh(labels, [seen[k] / 1e6 for k in labels])
    ax.set(xlabel="MB handed to the process group per step and worker", xscale="symlog")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out / "bytes-per-step.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


COMM_COLUMNS = [
    "rate", "label", "strategy", "codec", "time_to_target_s", "speedup_vs_ddp_fp32", "final_accuracy",
    "steps_to_target", "steps_per_s", "wire_bytes_per_step", "ceiling_vs_ddp_fp32",
]


def write_html(results: list[dict[str, Any]], out: Path, images: list[Path], title: str, command: str,
               columns: list[str] = COMM_COLUMNS) -> Path:

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}"
        return html.escape("-" if value is None else str(value))

    rows = "\n".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in results
    )
    figures = "\n".join(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></p>' for p in images)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:nth-child(-n+4){{text-align:left}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Command: <code>{html.escape(command)}</code></p>
<table><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>
{rows}
</table>
{figures}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
