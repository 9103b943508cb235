"""``shoal bench straggler``: strategies for unequal workers as real training runs.

Every configuration trains the same workload on ``workers`` local processes,
one of them made FACTOR times slower by ``--slowdown RANK:FACTOR`` (a CPU
quota, or busy-waiting where cgroups are not writable), to the target
accuracy or the step cap. Plain ``sync`` is the baseline in the same run; each
row reports its time to target, final accuracy, throughput and, for the
parameter-server strategies, the mean staleness of the updates applied.

The step budget is the same sample budget for all: a ``sync`` step takes N
batches, a parameter-server worker's step one, and every worker takes
``train.steps`` of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shoal.bench.comm import medians, median_step_s
from shoal.metrics.summary import write_json_atomic


@dataclass(frozen=True)
class StragglerRow:
    label: str
    strategy: str


FULL_ROWS = [
    StragglerRow("sync", "sync"),
    StragglerRow("sync-backup-1", "sync:backup=1"),
    StragglerRow("sync-balance", "sync:balance=throughput"),
    StragglerRow("async-ps", "async_ps"),
    StragglerRow("ssp-2", "ssp:staleness=2"),
    StragglerRow("ssp-8", "ssp:staleness=8"),
]
QUICK_ROWS = [FULL_ROWS[0], FULL_ROWS[3]]
QUICK_OVERRIDES = [
    "data.dataset=digits",
    "model=mlp:hidden=[512,512]",
    "data.batch_size=64",
    "train.steps=150",
    "train.eval_every=15",
    "train.target_accuracy=0.8",
]
MEDIAN_KEYS = ("final_accuracy", "steps", "train_time_s", "steps_per_s", "median_step_s", "mean_staleness",
               "samples_per_s")
# report.html's table, in this order (labels and formats: shoal.bench.report.FIELDS)
COLUMNS = ["label", "strategy", "slowdown", "time_to_target_s", "speedup_vs_sync", "final_accuracy",
           "accuracy_vs_sync", "samples_per_s", "throughput_vs_sync", "mean_staleness"]


def run_row(row: StragglerRow, *, workers: int, slowdown: list[str], config: Path, overrides: list[str],
            out: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """One training run through the CLI; returns (summary or None, log tail)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "shoal.cli", "train", str(config), "--workers", str(workers), "--out", str(out),
            "--set", f"strategy={row.strategy}"]
    for item in overrides:
        argv += ["--set", item]
    for item in slowdown:
        argv += ["--slowdown", item]
    with open(out / "train.log", "w") as log:
        try:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env=dict(os.environ))
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    tail = (out / "train.log").read_text()[-2000:]
    summary = out / "summary.json"
    return (json.loads(summary.read_text()) if ok and summary.is_file() else None), tail


def run_bench(*, workers: int, slowdown: list[str], out: Path, config: Path, rows: list[StragglerRow],
              overrides: list[str], timeout_s: float, repeat: int = 1,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row ``repeat`` times (interleaved); ``runs.json`` per run, medians in ``bench.json``."""
    runs: list[dict[str, Any]] = []
    condition = ",".join(slowdown) or "none"
    for k in range(repeat):
        for row in rows:
            run_dir = out / "runs" / row.label / (f"r{k}" if repeat > 1 else "")
            started = time.monotonic()
            summary, tail = run_row(row, workers=workers, slowdown=slowdown, config=config, overrides=overrides,
                                    out=run_dir, timeout_s=timeout_s)
            base = {"label": row.label, "strategy": row.strategy, "slowdown": condition, "repeat": k}
            if summary is None:
                log(f"{row.label}: FAILED after {time.monotonic() - started:.0f} s\n{tail}")
                runs.append({**base, "failed": True})
                continue
            result = {
                **base,
                "time_to_target_s": summary["time_to_target_s"],
                "steps_to_target": summary["steps_to_target"],
                "final_accuracy": summary["final_accuracy"],
                "steps": summary["steps"],
                "train_time_s": summary["train_time_s"],
                "steps_per_s": summary["steps"] / summary["train_time_s"],
                "samples_per_s": summary["samples_per_s"],
                "median_step_s": median_step_s(run_dir / "metrics.jsonl"),
                "mean_staleness": summary.get("mean_staleness"),
                "updates": summary.get("updates"),
                "metrics": str(run_dir / "metrics.jsonl"),
                "failed": False,
            }
            runs.append(result)
            ttt = result["time_to_target_s"]
            staleness = "" if result["mean_staleness"] is None else f", mean staleness {result['mean_staleness']:.2f}"
            log(f"{row.label}: accuracy {result['final_accuracy']:.3f}, time to target "
                f"{'not reached' if ttt is None else f'{ttt:.1f} s'}, {result['samples_per_s']:,.0f} samples/s"
                f"{staleness}")
            write_json_atomic(out / "runs.json", runs)
    results = medians(runs, MEDIAN_KEYS, group_by=("slowdown", "label"))
    base = next((r for r in results if r["label"] == "sync" and not r["failed"]), None)
    for r in results:
        if base and base.get("time_to_target_s") and r.get("time_to_target_s"):
            r["speedup_vs_sync"] = base["time_to_target_s"] / r["time_to_target_s"]
        if base and not r["failed"]:
            r["accuracy_vs_sync"] = r["final_accuracy"] - base["final_accuracy"]
            r["throughput_vs_sync"] = r["samples_per_s"] / base["samples_per_s"]
    write_json_atomic(out / "bench.json", results)
    return results
