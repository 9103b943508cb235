"""``shoal bench comm``: strategies and codecs as real training runs on shaped links.

For each link rate, an emulated cluster of ``workers`` namespace hosts (one
worker each, ``tc tbf`` on every host's link) runs every configuration to the
target accuracy or the step cap, through ``shoal train --nnodes`` on each
host. PyTorch's own paths run in the same benchmark as baselines:
``ddp-fp32`` (plain DDP), ``ddp-fp16-hook``, ``ddp-powersgd-hook``, and
``compute-only`` (a hook that does not communicate), from which the ceiling
of any codec on this workload follows:

    ideal   = ddp-fp32's steps to target x compute-only's median step time
    ceiling = ddp-fp32's time to target / ideal
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shoal.metrics.summary import write_json_atomic
from shoal.metrics.writer import read_metrics
from shoal.netem import Testbed


@dataclass(frozen=True)
class BenchRow:
    label: str
    strategy: str
    codec: str = "none"


FULL_ROWS = [
    BenchRow("ddp-fp32", "ddp"),
    BenchRow("ddp-fp16-hook", "ddp:hook=fp16"),
    BenchRow("ddp-powersgd-hook", "ddp:hook=powersgd,rank=2"),
    BenchRow("ddp-powersgd-hook-r4", "ddp:hook=powersgd,rank=4"),
    BenchRow("compute-only", "ddp:hook=local"),
    BenchRow("shoal-fp16", "sync", "fp16"),
    BenchRow("shoal-topk-ef", "sync", "topk:ratio=0.01,sample=0.01,memory=ef"),
    BenchRow("shoal-powersgd-ef", "sync", "powersgd:rank=4,memory=ef"),
    BenchRow("shoal-localsgd-8-fp16", "localsgd:period=8,warmup=40", "fp16"),
    BenchRow("shoal-localsgd-4-powersgd", "localsgd:period=4", "powersgd:rank=4,memory=ef"),
    BenchRow("shoal-auto", "sync", "auto"),
]
QUICK_ROWS = [
    BenchRow("ddp-fp32", "ddp"),
    BenchRow("ddp-fp16-hook", "ddp:hook=fp16"),
    BenchRow("compute-only", "ddp:hook=local"),
    BenchRow("shoal-topk-ef", "sync", "topk:ratio=0.01,sample=0.01,memory=ef"),
    BenchRow("shoal-auto", "sync", "auto"),
]
QUICK_OVERRIDES = [
    "model=cnn1d",
    "data.dataset=mnist1d:samples=4000",
    "train.steps=300",
    "train.eval_every=25",
    "train.target_accuracy=0.5",
    "optimizer.lr=0.1",
]
RDZV_PORT = 29400


def run_on_testbed(
    testbed: Testbed, config: Path, overrides: list[str], out: Path, timeout_s: float
) -> tuple[dict[str, Any] | None, str]:
    """One training run with one worker on every host; returns (summary or None, log tail)."""
    hosts = testbed.hosts
    job = f"bench-{uuid.uuid4().hex[:8]}"
    # A fresh store port per run: the last run's may still be closing.
    port = RDZV_PORT + int(uuid.uuid4().int % 500)
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(hosts):
        argv = [
            sys.executable, "-m", "shoal.cli", "train", str(config), "--workers", "1",
            "--nnodes", str(hosts), "--rdzv-endpoint", f"{testbed.host_address(0)}:{port}",
            "--rdzv-id", job, "--is-host" if i == 0 else "--not-host",
            "--local-addr", testbed.host_address(i), "--out", str(out),
        ]
        for item in overrides:
            argv += ["--set", item]
        log = open(out / f"host{i}.log", "w")
        logs.append(log)
        # All hosts share this machine's cores: size each worker's threads for that.
        env = dict(os.environ, SHOAL_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // hosts)))
        procs.append(testbed.popen(i, argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 15)  # the others wait for the dead one
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    summary_path = out / "summary.json"
    ok = all(p.returncode == 0 for p in procs) and summary_path.is_file()
    tail = (out / "host0.log").read_text()[-2000:]
    return (json.loads(summary_path.read_text()) if ok else None), tail


def run_bench(
    *,
    workers: int,
    rates: list[str | None],
    out: Path,
    config: Path,
    rows: list[BenchRow],
    extra_overrides: list[str],
    timeout_s: float,
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every row at every rate, ``repeat`` times (rows interleaved within a
    repetition, so slow drifts of the machine hit all alike). Writes each run
    to ``runs.json`` as it ends and the per-configuration medians to
    ``bench.json``; returns the medians."""
    runs: list[dict[str, Any]] = []
    for rate in rates:
        rate_name = rate or "none"
        with Testbed(workers, rate=rate) as testbed:
            for k in range(repeat):
                for row in rows:
                    run_dir = out / "runs" / rate_name / row.label
                    if repeat > 1:
                        run_dir = run_dir / f"r{k}"
                    runs.append(_run_row(testbed, row, rate_name, run_dir, config, extra_overrides, timeout_s, log))
                    runs[-1]["repeat"] = k
                    write_json_atomic(out / "runs.json", runs)
    results = medians(runs)
    add_ceilings(results)
    write_json_atomic(out / "bench.json", results)
    return results


def _run_row(
    testbed: Testbed, row: BenchRow, rate_name: str, run_dir: Path, config: Path, extra_overrides: list[str],
    timeout_s: float, log: Callable[[str], None],
) -> dict[str, Any]:
    overrides = [*extra_overrides, f"strategy={row.strategy}", f"codec={row.codec}"]
    if row.label == "compute-only":
        # Its workers never agree on a model, so it rarely reaches the
        # target: it only has to measure a step, and 100 are plenty.
        overrides += ["train.steps=100", "train.stop_at_target=false"]
    started = time.monotonic()
    summary, tail = run_on_testbed(testbed, config, overrides, run_dir, timeout_s)
    base = {"label": row.label, "strategy": row.strategy, "codec": row.codec, "rate": rate_name}
    if summary is None:
        log(f"[{rate_name}] {row.label}: FAILED after {time.monotonic() - started:.0f} s\n{tail}")
        return {**base, "failed": True}
    result = {
        **base,
        "codec_chosen": summary.get("codec_chosen"),
        "time_to_target_s": summary["time_to_target_s"],
        "steps_to_target": summary["steps_to_target"],
        "final_accuracy": summary["final_accuracy"],
        "wire_bytes_per_worker": summary["wire_bytes_per_worker"],
        "wire_bytes_per_step": summary["wire_bytes_per_worker"] / summary["steps"],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "steps_per_s": summary["steps"] / summary["train_time_s"],
        "median_step_s": median_step_s(run_dir / "metrics.jsonl"),
        "metrics": str(run_dir / "metrics.jsonl"),
        "failed": False,
    }
    ttt = result["time_to_target_s"]
    chosen = f" (auto chose {result['codec_chosen']})" if result["codec_chosen"] else ""
    log(
        f"[{rate_name}] {row.label}: accuracy {result['final_accuracy']:.3f}, "
        f"time to target {'not reached' if ttt is None else f'{ttt:.1f} s'}, "
        f"{result['steps_per_s']:.2f} steps/s, {result['wire_bytes_per_step'] / 1e6:.3f} MB/step{chosen}"
    )
    return result


MEDIAN_KEYS = ("final_accuracy", "wire_bytes_per_worker", "wire_bytes_per_step", "steps", "train_time_s",
               "steps_per_s", "median_step_s")
# report.html's table, in this order (labels and formats: shoal.bench.report.FIELDS)
COLUMNS = ["rate", "label", "strategy", "codec", "time_to_target_s", "speedup_vs_ddp_fp32", "final_accuracy",
           "steps_to_target", "steps_per_s", "wire_bytes_per_step", "ceiling_vs_ddp_fp32"]


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...] = MEDIAN_KEYS, *,
            group_by: tuple[str, ...] = ("rate", "label"), target: str = "time_to_target_s") -> list[dict[str, Any]]:
    """One row per ``group_by`` value (rate and label): medians over its repetitions of ``keys``.

    A run that never reached the target (``target`` is None) counts as slower
    than every run that did; the row's target figure is the upper median, so
    it is None exactly when at least half the runs never reached it. The row
    keeps every run's figure (``time_to_target_runs``: the target key without
    ``_s``, plus ``_runs``) and the metrics of that median run, for the plots.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in group_by), []).append(r)
    rows = []
    for group in groups.values():
        ok = [r for r in group if not r["failed"]]
        if not ok:
            rows.append({**group[0], "repeats": len(group), "failed_runs": len(group)})
            continue
        by_time = sorted(ok, key=lambda r: math.inf if r[target] is None else r[target])
        middle = by_time[len(by_time) // 2]  # the upper median: an actual run
        row = dict(middle)
        row.pop("repeat", None)
        for key in keys:
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row.update({"repeats": len(group), "failed_runs": len(group) - len(ok),
                    target.removesuffix("_s") + "_runs": [r[target] for r in ok]})
        rows.append(row)
    return rows


def median_step_s(metrics: Path) -> float:
    times = [m["time_s"] for m in read_metrics(metrics)]
    return statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("nan")


def add_ceilings(results: list[dict[str, Any]]) -> None:
    """Per rate: the ideal time (no network) and each row's speed-up over ddp-fp32."""
    for rate in {r["rate"] for r in results}:
        rows = {r["label"]: r for r in results if r["rate"] == rate and not r["failed"]}
        base, local = rows.get("ddp-fp32"), rows.get("compute-only")
        if not base or base["time_to_target_s"] is None:
            continue
        for r in rows.values():
            if r["time_to_target_s"]:
                r["speedup_vs_ddp_fp32"] = base["time_to_target_s"] / r["time_to_target_s"]
        if local:
            # The median step: compute-only workers never wait for each other
            # until an evaluation, so a few steps absorb the other's CPU time.
            ideal = base["steps_to_target"] * local["median_step_s"]
            for r in rows.values():
                r["ideal_time_s"] = ideal
                r["ceiling_vs_ddp_fp32"] = base["time_to_target_s"] / ideal
