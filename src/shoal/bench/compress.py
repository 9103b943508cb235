"""``shoal bench compress``: pruning and quantisation of reference models, measured against fp32.

For each model of the workload file (``examples/bench_compress.yaml``: the
reference ``cnn1d`` on MNIST-1D and ``cnn2d`` on ``digits``):

1. Train it with ``shoal train`` (``DIR/MODEL/train``).
2. ``fp32``, ``int8-dynamic``, ``int8-static``: one ``shoal compress`` of the
   unpruned model with both ONNX Runtime quantizers; ONNX Runtime's operator
   profile of the fp32 and the static int8 model at batch 32 goes into the
   ``int8-static`` row (``op_profile_ms``), to show why where it is not faster.
3. ``prune-S`` for each sparsity S: global magnitude pruning, fine-tuned
   ``bench.finetune_steps`` through ``shoal train`` with the masks held, stored
   as the sparse artefact with ``bench.values`` values.
4. ``channels-R``: structured pruning that removes R of every layer's
   channels, fine-tuned the same way; its operator profile against fp32 too.
5. ``prune-S+int8-static`` (S = ``bench.prune_int8``) and
   ``channels-R+int8-static``: static int8 of those pruned models.

Every row is one ``shoal compress`` measurement: artefact bytes (fp32 row:
``torch.save`` of the state dict; quantised rows: their ONNX file), non-zero
parameters, ONNX Runtime latency at batch 1 and 32 (``bench.threads`` thread,
median of ``bench.latency_repeats``) and test accuracy run in ONNX Runtime.
``size_ratio`` and ``accuracy_delta`` compare with the ``fp32`` row,
``speedup_batch1`` / ``speedup_batch32`` with the fp32 model timed in the
same ``shoal compress`` call (seconds before, so load drift cancels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from shoal.bench.comm import medians
from shoal.config import ConfigError, RunConfig, format_error, gather, load_config
from shoal.metrics.summary import write_json_atomic

QUICK_OVERRIDES = [
    "models={cnn2d: {workers: 1, data: {dataset: digits, batch_size: 32}, model: 'cnn2d:channels=8,hidden=32', "
    "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}, train: {steps: 150, eval_every: 150}}}",
    "bench.sparsities=[0.8]",
    "bench.prune_int8=0.8",
    "bench.finetune_steps=0",
    "bench.latency_repeats=10",
    "bench.profile_runs=5",
]
MEDIAN_KEYS = ("artefact_bytes", "size_ratio", "latency_ms_batch1", "latency_ms_batch32", "speedup_batch1",
               "speedup_batch32", "accuracy", "accuracy_delta")
SPEEDUP_TARGETS = {"int8": 1.5, "channels": 3.0}  # issue 7: int8-static and channels-50, batch 32
# report.html's table, in this order (labels and formats: shoal.bench.report.FIELDS)
COLUMNS = ["model", "label", "artefact_bytes", "size_ratio", "nonzero_parameters", "latency_ms_batch1",
           "speedup_batch1", "latency_ms_batch32", "speedup_batch32", "accuracy", "accuracy_delta", "finetune_steps"]


class BenchCompressOptions(BaseModel):
    """The ``bench:`` section of the workload file: which rows and how they are made."""

    model_config = ConfigDict(extra="forbid")
    sparsities: list[float] = Field([0.5, 0.8, 0.9, 0.95], description="unstructured global magnitude sparsities")
    channels: float = Field(0.5, gt=0, lt=1, description="share of every layer's channels structured pruning removes")
    prune_int8: float | None = Field(0.9, description="the sparsity of the prune + int8-static row (one of "
                                     "sparsities; None: no such row)")
    values: str = Field("int8", pattern="^(fp32|int8)$", description="the pruned rows' artefact values")
    finetune_steps: int = Field(300, ge=0, description="shoal train steps after pruning, masks held (0: none)")
    finetune: list[str] = Field([], description="--set overrides of the fine-tuning runs (optimizer.lr=...)")
    latency_repeats: int = Field(200, ge=1, description="timed ONNX Runtime runs per latency (median)")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads")
    profile_runs: int = Field(100, ge=1, description="runs of ONNX Runtime's operator profile at batch 32")


def load_bench(config: Path, overrides: list[str]) -> tuple[dict[str, RunConfig], BenchCompressOptions]:
    """The models' training configs and the bench options; every one validated before any work."""
    data = gather(config, overrides, {})
    try:
        options = BenchCompressOptions.model_validate(data.pop("bench", None) or {})
    except ValidationError as err:
        raise ConfigError("bench: " + format_error(err)) from None
    models = data.pop("models", None)
    if data:
        raise ConfigError(f"{config}: unknown top-level keys {sorted(data)}; allowed: models, bench")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{config}: 'models' must map a name to a shoal train config")
    if options.prune_int8 is not None and options.prune_int8 not in options.sparsities:
        raise ConfigError(f"bench.prune_int8: {options.prune_int8} is not one of bench.sparsities {options.sparsities}")
    if any(not 0 < s < 1 for s in options.sparsities):
        raise ConfigError(f"bench.sparsities: {options.sparsities}: each must be in (0, 1)")
    cfgs = {}
    for name, cfg in models.items():
        try:
            cfgs[name] = load_config(cfg)
            load_config(cfgs[name], options.finetune)
        except ConfigError as err:
            raise ConfigError(f"models.{name}: {err}") from None
    return cfgs, options


def _pct(share: float) -> str:
    return f"{share * 100:g}"


def plans(options: BenchCompressOptions) -> list[dict[str, Any]]:
    """One ``shoal compress`` call per plan: label, prune spec, artefact, quantizers, row labels."""
    out = [{"label": "fp32", "prune": [], "artefact": "sparse", "quantize": ["int8-dynamic", "int8-static"]}]
    for s in options.sparsities:
        out.append({"label": f"prune-{_pct(s)}", "prune": [f"magnitude:sparsity={s}"],
                    "artefact": f"sparse:values={options.values}",
                    "quantize": ["int8-static"] if s == options.prune_int8 else []})
    out.append({"label": f"channels-{_pct(options.channels)}", "prune": [f"channels:ratio={options.channels}"],
                "artefact": "sparse", "quantize": ["int8-static"]})
    return out


def _row(model: str, label: str, row: Any, plan: dict[str, Any], report: Any, finetune_steps: int) -> dict[str, Any]:
    base = report.rows[0]
    return {
        "model": model, "label": label, "spec": row.spec, "artefact_bytes": row.artefact_bytes,
        "onnx_bytes": row.onnx_bytes, "parameters": row.parameters, "nonzero_parameters": row.nonzero_parameters,
        "latency_ms_batch1": row.latency_ms_batch1, "latency_ms_batch32": row.latency_ms_batch32,
        "baseline_latency_ms_batch1": base.latency_ms_batch1, "baseline_latency_ms_batch32": base.latency_ms_batch32,
        "speedup_batch1": base.latency_ms_batch1 / row.latency_ms_batch1,
        "speedup_batch32": base.latency_ms_batch32 / row.latency_ms_batch32,
        "accuracy": row.accuracy, "max_abs_diff": row.max_abs_diff,
        "finetune_steps": finetune_steps if plan["prune"] else 0,
        "finetune_accuracy": (report.finetune or {}).get("accuracy"), "dir": report.out, "failed": False,
    }


def run_model(name: str, cfg: RunConfig, options: BenchCompressOptions, out: Path,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train one model, then every plan's ``shoal compress``; returns its rows (a failed plan: a failed row)."""
    import shoal
    from shoal.compress import compress

    train_dir = out / name / "train"
    log(f"{name}: training {cfg.model.spec()} on {cfg.data.dataset.spec()}, {cfg.train.steps} steps")
    summary = shoal.train(cfg, out=train_dir)
    log(f"{name}: trained, test accuracy {summary.final_accuracy:.4f}")
    rows: list[dict[str, Any]] = []
    for plan in plans(options):
        steps = options.finetune_steps if plan["prune"] else 0
        labels = [plan["label"], *(q if plan["label"] == "fp32" else f"{plan['label']}+{q}" for q in plan["quantize"])]
        try:
            report = compress(cfg, checkpoint=train_dir, prune=plan["prune"], quantize=plan["quantize"],
                              artefact=plan["artefact"], out=out / name / plan["label"], overrides=options.finetune,
                              threads=options.threads, repeats=options.latency_repeats, finetune_steps=steps)
        except Exception as err:  # one failed plan must not lose the others
            log(f"{name} {plan['label']}: FAILED: {type(err).__name__}: {err}")
            rows += [{"model": name, "label": label, "failed": True, "error": f"{type(err).__name__}: {err}"}
                     for label in labels]
            continue
        # The fp32 plan's "compressed" row (the unpruned model as a sparse artefact) says nothing new.
        measured = [report.rows[0], *report.rows[2:]] if plan["label"] == "fp32" else report.rows[1:]
        for label, row in zip(labels, measured):
            rows.append(_row(name, label, row, plan, report, steps))
        # Where the time goes: fp32 against each row the issue sets a latency target for.
        if plan["label"] == "fp32":
            add_profile(rows[-1], report, report.rows[-1], options)
        elif plan["label"].startswith("channels"):
            add_profile(rows[-len(labels)], report, report.rows[1], options)
        for row in rows[-len(labels):]:
            log(f"{name} {row['label']}: {row['artefact_bytes'] / 1000:,.1f} KB, b=32 "
                f"{row['latency_ms_batch32']:.3f} ms ({row['speedup_batch32']:.2f}x), accuracy {row['accuracy']:.4f}")
    return rows


def add_profile(row: dict[str, Any], report: Any, measured: Any, options: BenchCompressOptions) -> None:
    from shoal.compress.measure import op_profile

    row["op_profile_ms"] = {
        kind: op_profile(Path(report.out) / onnx, runs=options.profile_runs, threads=options.threads)
        for kind, onnx in (("fp32", report.rows[0].onnx), (row["label"], measured.onnx))}


def compare(rows: list[dict[str, Any]]) -> None:
    """Size ratio and accuracy delta of each row against its model's fp32 row."""
    base = {r["model"]: r for r in rows if r["label"] == "fp32" and not r["failed"]}
    for r in rows:
        b = base.get(r["model"])
        if b is None or r["failed"]:
            continue
        r["size_ratio"] = b["artefact_bytes"] / r["artefact_bytes"]
        r["accuracy_delta"] = r["accuracy"] - b["accuracy"]


def run_bench(cfgs: dict[str, RunConfig], options: BenchCompressOptions, *, out: Path, repeat: int = 1,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every model ``repeat`` times (seeds 0..repeat-1); every run in ``runs.json``, medians in ``bench.json``."""
    runs: list[dict[str, Any]] = []
    for k in range(repeat):
        for name, cfg in cfgs.items():
            seeded = load_config(cfg, [f"seed={k}"]) if repeat > 1 else cfg
            rows = run_model(name, seeded, options, out / (f"r{k}" if repeat > 1 else ""), log)
            compare(rows)
            runs += [{**r, "repeat": k} for r in rows]
            write_json_atomic(out / "runs.json", runs)
    results = medians(runs, MEDIAN_KEYS, group_by=("model", "label"), target="latency_ms_batch32")
    write_json_atomic(out / "bench.json", results)
    return results


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (smaller x, higher y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per model: accuracy against artefact size and against batch-32 latency, Pareto fronts drawn, each
    point labelled where its label covers no other."""
    from shoal.bench.labels import label_points
    from shoal.bench.report import plt
    from shoal.metrics.ticks import plain_ticks

    paths = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model and not r["failed"]]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
        panels = [(ax, [(r[key] / scale, r["accuracy"]) for r in rows]) for ax, key, scale in
                  ((axes[0], "artefact_bytes", 1000), (axes[1], "latency_ms_batch32", 1))]
        for (ax, points), xlabel in zip(panels, ("artefact (KB, log)", "ONNX Runtime latency at batch 32 (ms, log)")):
            front = pareto_front(points)
            ax.plot(*zip(*[points[i] for i in front]), color="tab:red", alpha=0.5, marker="o", markersize=11,
                    markerfacecolor="none", label="Pareto front")
            ax.scatter(*zip(*points), color=["black" if r["label"] == "fp32" else "tab:blue" for r in rows])
            ax.set(xscale="log", xlabel=xlabel, title=f"{model}: accuracy against {xlabel.split(' (')[0]}")
            ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
            plain_ticks(ax)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (ONNX Runtime)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        for ax, points in panels:  # once the layout is final: placement is in pixels
            label_points(ax, points, [r["label"] for r in rows])
        path = out / f"pareto-{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(results: list[dict[str, Any]], options: BenchCompressOptions, repeat: int, console: Console) -> None:
    """One line per row: each figure beside its ratio to the model's fp32 row (``-`` where that row failed)."""
    table = Table(title=f"shoal bench compress: ONNX Runtime {options.threads} thread(s), median of "
                        f"{options.latency_repeats} runs" + (f", medians of {repeat} seeds" if repeat > 1 else ""))
    for column in ("model", "row", "artefact", "non-zeros", "b=1", "b=32", "accuracy"):
        table.add_column(column, justify="left" if column in ("model", "row") else "right", no_wrap=True)

    def cell(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    for r in results:
        if r["failed"]:
            table.add_row(r["model"], r["label"], "FAILED", "", "", "", "")
            continue
        table.add_row(r["model"], r["label"], f"{r['artefact_bytes'] / 1000:,.1f} KB {cell(r['size_ratio'], '.1f')}x",
                      f"{r['nonzero_parameters']:,}", f"{r['latency_ms_batch1']:.3f} ms {cell(r['speedup_batch1'], '.2f')}x",
                      f"{r['latency_ms_batch32']:.3f} ms {cell(r['speedup_batch32'], '.2f')}x",
                      f"{r['accuracy']:.4f} {cell(r['accuracy_delta'] and r['accuracy_delta'] * 100, '+.1f')}pt")
    console.print(table)


def profile_lines(results: list[dict[str, Any]]) -> list[str]:
    """For each profiled row (int8-static, channels-R): its speed-up at batch 32 against the issue's
    target and the time per operator type, fp32 against it (the profiler's own overhead included)."""
    lines = []
    for r in results:
        profile = r.get("op_profile_ms")
        if r["failed"] or not profile:
            continue
        target = SPEEDUP_TARGETS[r["label"].split("-")[0]]
        verdict = "reaches" if r["speedup_batch32"] >= target else "misses"
        lines.append(f"{r['model']} {r['label']}: {r['speedup_batch32']:.2f}x at batch 32 ({verdict} {target}x); "
                     "ONNX Runtime profile, ms per batch-32 run by operator type:")
        for kind in ("fp32", r["label"]):
            ops = sorted(profile[kind].items(), key=lambda kv: -kv[1])
            total = sum(ms for _, ms in ops)
            lines.append(f"  {kind:>11} {total:.3f} ms: " + ", ".join(f"{op} {ms:.3f}" for op, ms in ops))
    return lines
