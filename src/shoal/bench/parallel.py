"""``shoal bench parallel``: pipeline and hybrid layouts on the emulated cluster,
measured against the planner's predictions.

The workload (``examples/bench_parallel.yaml``) is an MLP of a few million
parameters whose layers are far from equal (three wide layers, then three
narrow ones), with ``max_memory_per_worker`` below its data-parallel
footprint. Each row is one layout run with one worker per emulated host, at
each link rate: pipelines of 2 stages with the equal-layer and the automatic
partition, under 1F1B and GPipe, and a 2 x 2 hybrid. Data parallel is
predicted too, and measured where it fits the cap. For every row the
planner's prediction for that layout and link is recorded beside the
measured median step, so the planner is checked on every layout run.

Two more rows (``bubble-1f1b``, ``bubble-gpipe``) measure the schedules'
bubble on a coarser workload, without the memory cap: four 4096 x 4096
layers, whose ~100 ms per stage and microbatch dwarf a point-to-point exchange on
this machine (~1 ms). On the main workload a microbatch computes for a few
milliseconds per stage, so the exchanges on the critical path, not the
schedule, decide the idle share (BENCHMARKS.md, "Where a pipeline's idle
time goes"). Rows are compared (partition, schedule memory, the planner's
ranking) only with rows of the same workload.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from shoal.bench.comm import median_step_s, run_on_testbed
from shoal.config import load_config
from shoal.metrics.summary import write_json_atomic
from shoal.netem import Testbed
from shoal.netem.costmodel import Link
from shoal.netem.testbed import rate_bits
from shoal.parallel.partition import equal_split
from shoal.parallel.plan import CODECS, data_parallel, moments_per_parameter, pipeline
from shoal.parallel.costs import model_costs
from shoal.parallel.profile import update_seconds_per_parameter
from shoal.engine.optim import build_optimizer

LATENCY_S = 100e-6  # the planner's per-message latency for the emulated links (veth + bridge, loaded host)
UNSHAPED_BITS = 1e9  # unshaped veth pairs on this 2-core machine carry about 1 Gbit/s (DESIGN.md)


@dataclass(frozen=True)
class ParallelRow:
    label: str
    strategy: str  # "" = data parallel (sync)
    hosts: int
    stages: int = 1
    replicas: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    workload: tuple[str, ...] = ()  # overrides of the workload for this row (the bubble rows' model)

    @property
    def capped(self) -> bool:
        return not self.workload  # the cap belongs to the main workload


# Wide enough that a microbatch's compute dwarfs an exchange; 12 steps of ~2 s.
COARSE = ("model=mlp:hidden=[4096,4096,4096,4096,4096]", "train.steps=12", "train.eval_every=12")


FULL_ROWS = [
    ParallelRow("data-parallel-2", "", 2, replicas=2),
    ParallelRow("pp2-equal-1f1b", "pipeline:stages=2,microbatches=8,schedule=1f1b,partition=equal", 2, 2, 1, 8),
    ParallelRow("pp2-auto-1f1b", "pipeline:stages=2,microbatches=8,schedule=1f1b,partition=auto", 2, 2, 1, 8),
    ParallelRow("pp2-auto-gpipe", "pipeline:stages=2,microbatches=8,schedule=gpipe,partition=auto", 2, 2, 1, 8,
                "gpipe"),
    ParallelRow("hybrid-2x2", "pipeline:stages=2,microbatches=4,dp=2,partition=auto", 4, 2, 2, 4),
    ParallelRow("bubble-1f1b", "pipeline:stages=2,microbatches=8,schedule=1f1b,partition=auto", 2, 2, 1, 8,
                workload=COARSE),
    ParallelRow("bubble-gpipe", "pipeline:stages=2,microbatches=8,schedule=gpipe,partition=auto", 2, 2, 1, 8,
                "gpipe", workload=COARSE),
]
QUICK_ROWS = [FULL_ROWS[1], FULL_ROWS[2]]
QUICK_OVERRIDES = ["model=mlp:hidden=[512,512,512,32,32,32]", "train.steps=20", "train.eval_every=20"]


def predict(row: ParallelRow, costs: list, link: Link, batch: int, states: int, cap: float | None) -> Any:
    # The emulated hosts share this machine's cores: with more hosts than cores each
    # computes that much slower, which the planner is told (nothing else is adjusted).
    share = max(1.0, row.hosts / (os.cpu_count() or 1))
    costs = [replace(c, fixed_s=c.fixed_s * share, per_sample_s=c.per_sample_s * share) for c in costs]
    if not row.strategy:
        return data_parallel(costs, row.hosts, batch, link, CODECS[0], states, cap)
    bounds = equal_split(len(costs), row.stages) if "partition=equal" in row.strategy else None
    return pipeline(costs, row.stages, row.replicas, row.microbatches, batch * row.replicas, link, states, cap,
                    row.schedule, bounds)


def run_bench(*, rates: list[str], out: Path, config: Path, rows: list[ParallelRow], overrides: list[str],
              timeout_s: float, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    cfg = load_config(config, overrides)
    cap = _cap(cfg.strategy.options) if cfg.strategy.name == "pipeline" else None
    profiled: dict[tuple[str, ...], tuple[list, int]] = {}  # per workload
    for row in rows:
        if row.workload not in profiled:
            profiled[row.workload] = _profile(load_config(config, [*overrides, *row.workload]))
    results: list[dict[str, Any]] = []
    for rate in rates:
        shaped = rate != "none"
        link = Link(alpha_s=LATENCY_S, beta_bytes_per_s=(rate_bits(rate) if shaped else UNSHAPED_BITS) / 8)
        for row in rows:
            costs, states = profiled[row.workload]
            row_cap = cap if row.capped else None
            predicted = predict(row, costs, link, cfg.data.batch_size, states, row_cap)
            base = {"label": row.label, "rate": rate, "strategy": row.strategy or "sync",
                    "workload": " ".join(row.workload) or "main",
                    "predicted_step_s": predicted.step_s, "predicted_memory_bytes": predicted.memory_bytes,
                    "fits": predicted.fits, "bubble_fraction_theory": predicted.bubble_fraction if row.strategy else 0}
            if not predicted.fits and not row.strategy:  # data parallel runs where it fits; pipelines always
                log(f"{rate} {row.label}: does not fit ({predicted.memory_bytes / 2**20:,.1f} MiB predicted "
                    f"over the {cap / 2**20:,.1f} MiB cap); not run")
                results.append({**base, "failed": False, "measured": False})
                continue
            run_dir = out / "runs" / rate / row.label
            capped = row_cap and "auto" in row.strategy
            strategy = row.strategy + (f",max_memory_per_worker={int(row_cap)}" if capped else "")
            extra = [*overrides, *row.workload, f"strategy={strategy}" if row.strategy else "strategy=sync"]
            with Testbed(row.hosts, rate=rate if shaped else None) as testbed:
                summary, tail = run_on_testbed(testbed, config, extra, run_dir, timeout_s)
            if summary is None:
                log(f"{rate} {row.label}: FAILED\n{tail}")
                results.append({**base, "failed": True, "measured": False})
                continue
            measured = median_step_s(run_dir / "metrics.jsonl")
            result = {
                **base, "failed": False, "measured": True,
                "samples_per_s": summary["samples_per_s"], "final_accuracy": summary["final_accuracy"],
                "measured_step_s": measured,
                "prediction_error": abs(predicted.step_s - measured) / measured,
                "bubble_fraction": summary.get("bubble_fraction"),
                "stage_imbalance": summary.get("stage_imbalance"),
                "stage_compute_s": summary.get("stage_compute_s"),
                "partition": summary.get("partition"),
                "peak_memory_bytes": summary.get("peak_memory_bytes"),
                "training_memory_bytes": summary.get("training_memory_bytes"),
                "held_parameter_bytes": summary.get("held_parameter_bytes"),
                "peak_activation_bytes": summary.get("peak_activation_bytes"),
                "wire_bytes_per_worker": summary["wire_bytes_per_worker"],
            }
            results.append(result)
            log(f"{rate} {row.label}: {result['samples_per_s']:,.0f} samples/s, step {measured * 1e3:,.1f} ms "
                f"(predicted {predicted.step_s * 1e3:,.1f}), bubble {_fmt(result['bubble_fraction'])} "
                f"(theory {_fmt(base['bubble_fraction_theory'])}), imbalance {_fmt(result['stage_imbalance'])}")
            write_json_atomic(out / "bench.json", results)
    _compare(results)
    write_json_atomic(out / "bench.json", results)
    return results


def _compare(results: list[dict[str, Any]]) -> None:
    """Auto vs equal partition, 1F1B vs GPipe memory, and the planner's ranking, per rate and workload."""
    for rate, workload in {(r["rate"], r["workload"]) for r in results}:
        rows = {r["label"]: r for r in results if r["rate"] == rate and r["workload"] == workload and r.get("measured")}
        auto, equal = rows.get("pp2-auto-1f1b") or rows.get("bubble-1f1b"), rows.get("pp2-equal-1f1b")
        gpipe = rows.get("pp2-auto-gpipe") or rows.get("bubble-gpipe")
        if auto and equal:
            auto["throughput_vs_equal"] = auto["samples_per_s"] / equal["samples_per_s"]
        if auto and gpipe and gpipe.get("peak_activation_bytes"):
            auto["activation_memory_vs_gpipe"] = auto["peak_activation_bytes"] / gpipe["peak_activation_bytes"]
        measured = list(rows.values())
        if len(measured) > 1:
            # Right when the layout measured fastest is one predicted fastest; the planner
            # predicts some layouts alike (1F1B and GPipe of one partition take the same
            # slots), and a tie within 1% is a tie, not a pick.
            fastest = min(measured, key=lambda r: r["measured_step_s"])
            best = min(r["predicted_step_s"] for r in measured)
            for r in measured:
                r["planner_ranked_fastest_first"] = fastest["predicted_step_s"] <= best * 1.01


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The planner's median error over every measured row, and at how many
    (rate, workload) cases it ranked the fastest layout first."""
    errors = [r["prediction_error"] for r in results if r.get("measured")]
    cases = sorted({(r["rate"], r["workload"]) for r in results if "planner_ranked_fastest_first" in r})
    ranked = [next(r["planner_ranked_fastest_first"] for r in results
                   if (r["rate"], r["workload"]) == case and "planner_ranked_fastest_first" in r) for case in cases]
    return {"median_prediction_error": statistics.median(errors) if errors else None,
            "cases_ranked_right": sum(ranked), "cases": len(ranked)}


def _profile(cfg: Any) -> tuple[list, int]:
    """The planner's layer costs, measured here on one thread (as each emulated host's worker runs)."""
    from shoal.data import build_dataset
    from shoal.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = build_dataset(cfg.data.dataset)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data)
        batch = max(cfg.data.batch_size, 8)
        per_param = update_seconds_per_parameter(model, lambda params: build_optimizer(cfg.optimizer, params))
        costs, _ = model_costs(model, data.train.tensors[0][:batch], max_stages=4, update_s_per_param=per_param)
    finally:
        torch.set_num_threads(threads)
    return costs, moments_per_parameter(cfg.optimizer.name, getattr(cfg.optimizer, "momentum", 0.0))


def _cap(options: Any) -> float | None:
    cap = getattr(options, "max_memory_per_worker", None)
    return float(cap) if cap else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
