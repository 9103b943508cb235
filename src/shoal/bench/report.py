"""Plots and an HTML page for a benchmark's ``bench.json`` rows.

``bench.json`` keeps the raw field names (``artefact_bytes``); the page shows
each through :data:`FIELDS`, the one place a field gets its label, unit and
number format.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shoal.metrics.ticks import plain_ticks, significant  # noqa: E402
from shoal.metrics.writer import read_metrics  # noqa: E402

MISSING = "–"


def text(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def integer(value: float) -> str:
    return f"{round(value):,}"


def ratio(value: float) -> str:
    """Times the baseline measured in the same run: 2.28x."""
    return f"{significant(value)}x"


def percent(value: float) -> str:
    """A share (0.9723) as a percentage (97.23)."""
    return f"{value * 100:.2f}"


def points(value: float) -> str:
    """A difference of shares (-0.0041) in percentage points (-0.41)."""
    return f"{value * 100:+.2f}"


def kilobytes(value: float) -> str:
    return significant(value / 1e3)


def megabytes(value: float) -> str:
    return significant(value / 1e6)


class Field(NamedTuple):
    """How the page shows one ``bench.json`` field: its column header, its values, what the legend under
    the table says about it (fields sharing a note share one line), and how its text wraps: ``name`` never
    (a row's identity), ``prose`` freely, others after a spec's separators."""

    label: str
    format: Callable[[Any], str] = text
    note: str = ""
    wrap: str = ""

    @property
    def numeric(self) -> bool:
        return self.format is not text


SPEEDUP = "speed-ups and reductions: the baseline's figure over the row's, higher is better"
POINTS = "points: percentage points"
FIELDS: dict[str, Field] = {
    # what a row is
    "label": Field("configuration", wrap="name"),
    "model": Field("model", wrap="name"),
    "strategy": Field("strategy"),
    "codec": Field("codec"),
    "rate": Field("link rate"),
    "slowdown": Field("slow workers (rank:factor)"),
    "partition": Field("data partition"),
    "note": Field("note", wrap="prose"),
    "kind": Field("run by"),
    "target_epsilon": Field("target epsilon", significant),
    "epsilon": Field("epsilon spent (PLD)", significant, "epsilon: at delta 1e-5 unless the bench says otherwise, "
                     "by shoal's PLD accountant for the row's noise, sampling rate and steps"),
    "noise_multiplier": Field("noise multiplier", significant),
    "train_time_s": Field("training time (s)", significant),
    # time and throughput
    "time_to_target_s": Field("time to target (s)", significant),
    "steps_to_target": Field("steps to target", integer),
    "steps_per_s": Field("steps per second", significant),
    "samples_per_s": Field("samples per second", integer),
    "mean_staleness": Field("mean staleness (steps)", significant),
    "rounds_to_target": Field("rounds to target", integer),
    "rounds": Field("rounds run", integer),
    "finetune_steps": Field("fine-tuning steps", integer),
    # accuracy: shares as percentages, differences in points
    "final_accuracy": Field("final test accuracy (%)", percent),
    "accuracy": Field("test accuracy (%)", percent),
    "accuracy_delta": Field("accuracy vs fp32 (points)", points, POINTS),
    "accuracy_vs_sync": Field("accuracy vs sync (points)", points, POINTS),
    "accuracy_vs_opacus": Field("accuracy vs Opacus (points)", points, POINTS),
    "accuracy_vs_fedavg": Field("accuracy vs FedAvg (points)", points, POINTS),
    "accuracy_vs_centralised": Field("accuracy vs centralised (points)", points, POINTS),
    # bytes, sizes, latencies
    "wire_bytes_per_step": Field("sent per step and worker (KB)", kilobytes),
    "uplink_bytes": Field("uplink, all rounds (MB)", megabytes),
    "artefact_bytes": Field("artefact size (KB)", kilobytes),
    "nonzero_parameters": Field("non-zero parameters", integer),
    "latency_ms_batch1": Field("latency, batch 1 (ms)", significant),
    "latency_ms_batch32": Field("latency, batch 32 (ms)", significant),
    # ratios against the baseline measured in the same run
    "speedup_vs_ddp_fp32": Field("speed-up vs DDP fp32", ratio, SPEEDUP),
    "ceiling_vs_ddp_fp32": Field("no-network ceiling vs DDP fp32", ratio,
                                 "no-network ceiling: the speed-up over DDP fp32 if communication cost nothing"),
    "speedup_vs_sync": Field("speed-up vs sync", ratio, SPEEDUP),
    "throughput_vs_none": Field("throughput vs non-private", ratio,
                                "throughput vs non-private: its samples per second over the none row's"),
    "throughput_vs_sync": Field("throughput vs sync", ratio, "throughput vs sync: its samples per second over sync's"),
    "rounds_vs_fedavg": Field("rounds vs FedAvg", ratio, "rounds vs FedAvg: its rounds to target over FedAvg's, "
                              "lower is better (> where it never got there: at least that)"),
    "uplink_reduction": Field("uplink reduction vs FedAvg", ratio, SPEEDUP),
    "size_ratio": Field("size reduction vs fp32", ratio, SPEEDUP),
    "speedup_batch1": Field("speed-up, batch 1", ratio, SPEEDUP),
    "speedup_batch32": Field("speed-up, batch 32", ratio, SPEEDUP),
    # secure aggregation (shoal bench secure)
    "clients": Field("clients", integer),
    "dropped": Field("dropped", integer),
    "uplink_bytes_per_client": Field("uplink per client (KB)", kilobytes),
    "uplink_vs_fp32": Field("uplink vs fp32", ratio, "uplink vs fp32: a client's bytes over 4 bytes a value, "
                            "lower is better"),
    "overhead_fraction": Field("keys and shares vs payload (%)", percent),
    "client_s": Field("client (s)", significant),
    "server_s": Field("server (s)", significant),
    "unmask_s": Field("server unmasking (s)", significant),
    "plain_server_s": Field("plain server (s)", significant),
    "critical_path_s": Field("client + server (s)", significant),
    "max_abs_error": Field("largest error in the sum", significant),
    # scheduling (shoal sched simulate)
    "policy": Field("policy", wrap="name"),
    "load": Field("load", significant),
    "jobs": Field("jobs", integer),
    "avg_jct_h": Field("mean JCT (h)", significant, "JCT: job completion time, submission to finish"),
    "p50_jct_h": Field("p50 JCT (h)", significant),
    "p95_jct_h": Field("p95 JCT (h)", significant),
    "p99_jct_h": Field("p99 JCT (h)", significant),
    "avg_jct_vs_first": Field("mean JCT vs the first policy", ratio, "mean JCT vs the first policy: the row's "
                              "over the first policy's at the same load, lower is better"),
    "makespan_h": Field("makespan (h)", significant),
    "avg_queue_h": Field("mean queueing delay (h)", significant),
    "utilisation": Field("GPU utilisation (%)", percent),
    "preemptions_per_job": Field("preemptions a job", significant),
    "worst_queue_slowdown": Field("worst queue's mean slowdown", significant, "slowdown: a job's JCT over its "
                                  "own running time; the worst queue's mean is the fairness figure"),
    "worst_queue": Field("worst queue"),
}


def field(name: str) -> Field:
    """``name``'s entry in :data:`FIELDS`; a field nobody described yet gets its name in words."""
    return FIELDS.get(name) or Field(name.replace("_", " "))


def format_value(name: str, value: Any) -> str:
    """``value`` of field ``name`` as the page shows it: ``–`` where it is missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    spec = field(name)
    if spec.numeric and not isinstance(value, (int, float)):
        return text(value)
    return spec.format(value)


def plot_accuracy(results: list[dict[str, Any]], out: Path, *, group: str = "rate",
                  title: str = "link {}", x: str = "time_s", xlabel: str = "training time (s)") -> list[Path]:
    """One PNG per value of ``group`` (the link rate): test accuracy against
    ``x`` (training time, or ``round``), a line per configuration."""
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
        plain_ticks(ax, integer_x=x == "round")
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
    kb = [seen[k] / 1e3 for k in labels]
    bars = ax.barh(labels, kb)
    ax.bar_label(bars, [f"{kilobytes(seen[k])} KB" for k in labels], padding=3, fontsize=8)
    # Logarithmic above the smallest non-zero figure (codecs span orders of magnitude), linear below it
    # so that a row sending nothing (compute-only) still has a place.
    ax.set_xscale("symlog", linthresh=min([v for v in kb if v > 0], default=1))
    ax.set(xlabel="KB handed to the process group per step and worker", xlim=(0, max(kb, default=1) * 3))
    plain_ticks(ax)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out / "bytes-per-step.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Fits a 1280 px window: headers wrap, numbers do not; the table scrolls inside its own box only when
# its columns' narrowest widths still do not fit.
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0 auto;padding:24px;
  max-width:1500px;box-sizing:border-box}
h1{font-size:22px;margin:0 0 8px}
p.command{margin:0 0 16px;color:#57606a}
code{font-size:12px;background:#f6f8fa;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
.table{overflow-x:auto;max-width:100%;margin-bottom:8px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px}
th{background:#f6f8fa;font-weight:600;text-align:left;vertical-align:bottom;min-width:4.5em;hyphens:auto}
th.num{text-align:right}
td{vertical-align:top}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.name{white-space:nowrap}
td.prose{min-width:12em;max-width:28em;color:#57606a}
td.failed{color:#cf222e}
tbody tr:nth-child(even) td{background:#fbfcfd}
p.legend{font-size:12px;color:#57606a;margin:0 0 20px}
figure{margin:0 0 24px}
img{display:block;max-width:100%;height:auto}
"""


def _row_html(row: dict[str, Any], columns: Sequence[str]) -> str:
    def cell(c: str) -> str:
        value = html.escape(format_value(c, row.get(c)))
        if row.get(f"{c}_bound") == "lower" and row.get(c) is not None:  # it never got there: at least this
            value = f"&gt;&nbsp;{value}"
        if field(c).numeric:
            return f"<td class=num>{value}</td>"
        if field(c).wrap:
            return f"<td class={field(c).wrap}>{value}</td>"
        # A spec (topk:ratio=0.05,memory=ef) may wrap after its separators, never inside a word.
        return "<td>" + re.sub(r"([,:+/])", r"\1<wbr>", value) + "</td>"

    if not row.get("failed"):
        return "<tr>" + "".join(cell(c) for c in columns) + "</tr>"
    # A failed row: what it is (its leading text fields), then why it has no figures.
    lead = list(itertools.takewhile(lambda c: c in row and not field(c).numeric and field(c).wrap != "prose",
                                    columns[:-1]))
    reason = "failed" + (f": {row['error']}" if row.get("error") else "")
    return ("<tr>" + "".join(cell(c) for c in lead)
            + f'<td class=failed colspan={len(columns) - len(lead)}>{html.escape(reason)}</td></tr>')


def write_html(results: list[dict[str, Any]], out: Path, images: Sequence[Path], title: str, command: str,
               columns: Sequence[str]) -> Path:
    """``OUT/report.html``: the rows as a table of :data:`FIELDS`' labels and formats, then the images."""
    columns = list(columns)
    headers = "".join(
        f'<th{" class=num" if field(c).numeric else ""} title="bench.json: {html.escape(c)}">'
        f"{html.escape(field(c).label)}</th>" for c in columns)
    rows = "\n".join(_row_html(r, columns) for r in results)
    repeats = {r.get("repeats") for r in results if not r.get("failed")} - {None, 1}
    notes = [*dict.fromkeys(field(c).note for c in columns if field(c).note),
             f"{MISSING}: not measured, or the target not reached",
             *([f"medians of {'/'.join(str(n) for n in sorted(repeats))} runs"] if repeats else []),
             "raw values in bench.json (a header's tooltip names its field)"]
    legend = "; ".join(notes) + "."
    figures = "\n".join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem.replace("-", " "))}">'
                        "</figure>" for p in images)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="command">Command: <code>{html.escape(command)}</code></p>
<div class="table"><table>
<thead><tr>{headers}</tr></thead>
<tbody>
{rows}
</tbody>
</table></div>
<p class="legend">{html.escape(legend)}</p>
{figures}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
