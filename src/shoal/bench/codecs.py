"""Encode + decode throughput of every codec on one large tensor, and the table of it.

For each codec: median wall time of ``decode(encode(x))`` over repetitions on
an fp32 tensor of ``numel`` elements (default 25 M, a 100 MB gradient), as
GB/s of input, plus the payload's wire bytes and compression ratio. A codec
whose decode hands back the input tensor itself (``none``) does no work: its
time is call overhead, so it gets no GB/s; a memory copy of the same tensor,
timed in the same run, is the baseline the GB/s column reads against. Also the
sampled top-k path against exact ``torch.topk`` at the same ratio.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from shoal.comm.codecs import build_codec
from shoal.comm.hooks import LocalComm
from shoal.metrics.report import format_bytes
from shoal.registry import CODECS, load_builtins

DEFAULT_SPECS = [
    "none", "fp16", "bf16", "int8", "qsgd:levels=7", "terngrad", "signsgd",
    "topk:ratio=0.001", "topk:ratio=0.001,sample=0.01", "randk:ratio=0.001", "threshold:tau=3.0", "powersgd:rank=4",
]


def time_codec(spec: str, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    codec = build_codec(CODECS.resolve(spec))
    times, wire, passthrough = [], 0, False
    for i in range(repeats + 1):
        started = time.perf_counter()
        if codec.capabilities.multi_round:
            comm = LocalComm()  # PowerSGD, threshold: their own rounds, on one worker
            codec.exchange(0, x, comm)
            wire = comm.sent
        else:
            payload = codec.encode(x)
            passthrough = codec.decode(payload) is x
            wire = payload.wire_bytes
        if i:  # the first call warms allocators and caches
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    dense = x.numel() * 4
    return {
        "codec": spec,
        "median_s": seconds,
        "gb_per_s": None if passthrough else dense / seconds / 1e9,
        "passthrough": passthrough,  # decode returned x itself: nothing was encoded or copied
        "wire_bytes": wire,
        "compression": dense / wire,
    }


def time_copy(x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``x.clone()``: one read and one write of the tensor, the baseline for GB/s."""
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        x.clone()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(numel: int = 25_000_000, repeats: int = 5, specs: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    load_builtins()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    copy_s = time_copy(x, repeats)
    rows = [time_codec(spec, x, repeats) for spec in (specs or DEFAULT_SPECS)]
    by_name = {r["codec"]: r for r in rows}
    exact, sampled = by_name.get("topk:ratio=0.001"), by_name.get("topk:ratio=0.001,sample=0.01")
    return {
        "numel": numel,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "copy_s": copy_s,
        "copy_gb_per_s": numel * 4 / copy_s / 1e9,
        "rows": rows,
        "sampled_topk_speedup": exact["median_s"] / sampled["median_s"] if exact and sampled else None,
    }


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _gb_per_s(rate: float) -> str:
    # Three significant figures: the quantisers run at 0.1-0.6 GB/s, a copy at tens.
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:#.3g}"


def report_table(report: dict[str, Any]) -> Group:
    """:func:`run`'s report as ``shoal bench codecs`` prints it: the memory-copy baseline, one row per
    codec, then what the baseline and a pass-through row mean and the sampled top-k speed-up."""
    table = Table(title=f"codec throughput, {report['numel']:,} fp32 elements, {report['threads']} threads")
    for column in ("codec", "encode+decode", "GB/s", "wire bytes", "compression"):
        table.add_column(column, justify="left" if column == "codec" else "right", overflow="fold")
    table.add_row("(memory copy)", _duration(report["copy_s"]), _gb_per_s(report["copy_gb_per_s"]), "-", "-",
                  style="dim")
    for row in report["rows"]:
        table.add_row(
            row["codec"], _duration(row["median_s"]), "-" if row["gb_per_s"] is None else _gb_per_s(row["gb_per_s"]),
            format_bytes(row["wire_bytes"]), f"{row['compression']:.0f}x",
        )
    lines = ["GB/s: fp32 input per second; (memory copy): x.clone() of the same tensor in the same run."]
    passthrough = [row["codec"] for row in report["rows"] if row["passthrough"]]
    if passthrough:
        lines.append(f"{', '.join(passthrough)}: {'hands' if len(passthrough) == 1 else 'hand'} the tensor back "
                     "untouched (no copy), so the time is call overhead, not throughput.")
    speedup = report["sampled_topk_speedup"]
    if speedup is not None:
        lines.append("sampled top-k (DGC) vs exact torch.topk at ratio 0.001: "
                     + (f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"))
    return Group(table, *(Text(line) for line in lines))
