"""Encode + decode throughput of every codec on one large tensor.

For each codec: median wall time of ``decode(encode(x))`` over repetitions on
an fp32 tensor of ``numel`` elements (default 25 M, a 100 MB gradient), as
GB/s of input, plus the payload's wire bytes and compression ratio. Also the
sampled top-k path against exact ``torch.topk`` at the same ratio.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from shoal.comm.codecs import build_codec
from shoal.comm.hooks import LocalComm
from shoal.registry import CODECS, load_builtins

DEFAULT_SPECS = [
    "none", "fp16", "bf16", "int8", "qsgd:levels=7", "terngrad", "signsgd",
    "topk:ratio=0.001", "topk:ratio=0.001,sample=0.01", "randk:ratio=0.001", "threshold:tau=3.0", "powersgd:rank=4",
]


def time_codec(spec: str, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    codec = build_codec(CODECS.resolve(spec))
    times, wire = [], 0
    for i in range(repeats + 1):
        started = time.perf_counter()
        if codec.capabilities.multi_round:
            comm = LocalComm()  # PowerSGD, threshold: their own rounds, on one worker
            codec.exchange(0, x, comm)
            wire = comm.sent
        else:
            payload = codec.encode(x)
            codec.decode(payload)
            wire = payload.wire_bytes
        if i:  # the first call warms allocators and caches
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    dense = x.numel() * 4
    return {
        "codec": spec,
        "median_s": seconds,
        "gb_per_s": dense / seconds / 1e9,
        "wire_bytes": wire,
        "compression": dense / wire,
    }


def run(numel: int = 25_000_000, repeats: int = 5, specs: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    load_builtins()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    rows = [time_codec(spec, x, repeats) for spec in (specs or DEFAULT_SPECS)]
    by_name = {r["codec"]: r for r in rows}
    exact, sampled = by_name.get("topk:ratio=0.001"), by_name.get("topk:ratio=0.001,sample=0.01")
    return {
        "numel": numel,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "sampled_topk_speedup": exact["median_s"] / sampled["median_s"] if exact and sampled else None,
    }
