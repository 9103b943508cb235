"""``shoal bench privacy``: what differential privacy costs, measured against its baselines in one run.

Rows (labels for ``--rows``):

- ``none``: the workload (``examples/bench_privacy.yaml``) through ``shoal train`` without privacy
  (with ``bench.none_set``: by default a learning rate of 0.1, as unclipped gradients need), the
  accuracy and throughput every private row is compared with;
- ``dp-sgd-epsE`` per ``bench.epsilons``: the same run under ``privacy: dp_sgd:target_epsilon=E``
  (the noise calibrated by shoal, Poisson sampling, every worker);
- ``opacus-epsE``: a plain Opacus loop on the same model, data, optimiser, steps, clip, seed and
  global batch (:mod:`shoal.bench.opacus_loop`), in one process with as many threads as shoal has
  workers; skipped, saying why, where Opacus is not installed (``pip install opacus``);
- ``fedavg`` and ``dp-fedavg-epsE`` (``bench.fl_epsilon``): ``shoal fl simulate`` of
  ``bench.fl_config`` with ``bench.fl_set`` (1,000 clients, 100 a round), without and with
  client-level DP-FedAvg calibrated to E, adaptive clipping on; its clip norm per round is
  plotted against the update norms' target quantile.

Every run is a subprocess (``DIR/runs/LABEL``); ``bench.json`` holds the medians over
``--repeat``, with ``throughput_vs_none`` (samples a second over the ``none`` row's),
``accuracy_vs_opacus`` (shoal's accuracy minus Opacus's at the same target epsilon) and
``accuracy_vs_fedavg``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.bench.comm import medians
from shoal.config import ConfigError, RunConfig, format_error, gather, validate_config
from shoal.metrics.summary import write_json_atomic

QUICK_OVERRIDES = [
    "data.dataset=digits",
    "data.batch_size=16",
    "model=mlp:hidden=[32]",
    "optimizer.lr=0.2",
    "train.steps=40",
    "train.eval_every=20",
    "bench.epsilons=[8]",
    "bench.fl_set=[data.dataset=digits, data.batch_size=16, 'model=mlp:hidden=[32]', fl.clients=20, "
    "fl.clients_per_round=10, fl.rounds=5, fl.eval_every=5, fl.stop_at_target=false]",
]
MEDIAN_KEYS = ("final_accuracy", "samples_per_s", "train_time_s", "epsilon", "noise_multiplier", "wall_time_s")
# report.html's table, in this order (labels and formats: shoal.bench.report.FIELDS)
COLUMNS = ["label", "kind", "target_epsilon", "epsilon", "noise_multiplier", "final_accuracy", "accuracy_vs_opacus",
           "accuracy_vs_fedavg", "samples_per_s", "throughput_vs_none", "train_time_s"]


class BenchPrivacyOptions(BaseModel):
    """The ``bench:`` section of the workload file."""

    model_config = ConfigDict(extra="forbid")
    epsilons: list[float] = Field([8.0, 3.0, 1.0], min_length=1, description="DP-SGD target epsilons")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of every row's (epsilon, delta)")
    clip: float = Field(1.0, gt=0, description="per-example clip norm (DP-SGD and Opacus)")
    none_set: list[str] = Field(["optimizer.lr=0.1"], description="--set overrides of the non-private row only: "
                                "unclipped gradients need a smaller step than DP-SGD's clipped ones")
    opacus: bool = Field(True, description="the Opacus rows (skipped where Opacus is not installed)")
    fl_config: str | None = Field("examples/fl_mnist1d.yaml", description="the federated workload (none: no FL rows)")
    fl_set: list[str] = Field(["fl.clients=1000", "fl.clients_per_round=100", "fl.rounds=100", "fl.eval_every=10",
                               "fl.stop_at_target=false"], description="--set overrides of the FL rows "
                              "(examples/bench_privacy.yaml sets its own)")
    fl_epsilon: float = Field(8.0, gt=0, le=100, description="DP-FedAvg's target epsilon")
    fl_privacy: list[str] = Field(["fl.privacy.adaptive=true"], description="more --set for the DP-FedAvg row")
    timeout_s: float = Field(3600, gt=0, description="seconds before one run is killed")


@dataclass(frozen=True)
class PrivacyRow:
    label: str
    kind: str  # train | opacus | fl
    epsilon: float | None  # the target; None: not private


def all_rows(options: BenchPrivacyOptions) -> list[PrivacyRow]:
    def tag(e: float) -> str:
        return f"eps{e:g}"

    rows = [PrivacyRow("none", "train", None)]
    rows += [PrivacyRow(f"dp-sgd-{tag(e)}", "train", e) for e in options.epsilons]
    if options.opacus:
        rows += [PrivacyRow(f"opacus-{tag(e)}", "opacus", e) for e in options.epsilons]
    if options.fl_config:
        rows += [PrivacyRow("fedavg", "fl", None), PrivacyRow(f"dp-fedavg-{tag(options.fl_epsilon)}", "fl",
                                                              options.fl_epsilon)]
    return rows


def load_bench(config: Path, overrides: list[str]) -> tuple[RunConfig, BenchPrivacyOptions]:
    """The workload's run config and the bench options; both validated before any run."""
    data = gather(config, overrides, {})
    try:
        options = BenchPrivacyOptions.model_validate(data.pop("bench", None) or {})
    except ValidationError as err:
        raise ConfigError("bench: " + format_error(err)) from None
    cfg = validate_config(data)
    if cfg.privacy is not None:
        raise ConfigError("privacy: the workload must be non-private; the bench adds privacy to its rows")
    if options.fl_config:
        from shoal.fl.config import load_fl_config

        load_fl_config(Path(options.fl_config), options.fl_set)
    return cfg, options


def target_quantile(options: BenchPrivacyOptions) -> float:
    """The DP-FedAvg row's adaptive-clipping target quantile (its --set, else the config's default)."""
    from shoal.fl.config import PrivacyConfig

    for item in reversed(options.fl_privacy):
        key, _, value = item.partition("=")
        if key.strip() == "fl.privacy.target_quantile":
            return float(value)
    return PrivacyConfig.model_fields["target_quantile"].default


def opacus_missing() -> str | None:
    """Why the Opacus rows cannot run here, or None."""
    if importlib.util.find_spec("opacus") is None:
        return "Opacus is not installed (pip install opacus: an optional bench extra)"
    return None


def _run(argv: list[str], out: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """One run's subprocess; ``(its summary.json or None, the log's tail)``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "w") as log:
        try:
            ok = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                env=dict(os.environ)).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    summary = out / "summary.json"
    return (json.loads(summary.read_text()) if ok and summary.is_file() else None), (out / "run.log").read_text()[-2000:]


def _privacy_setting(row: PrivacyRow, options: BenchPrivacyOptions) -> list[str]:
    return [] if row.epsilon is None else [
        f"privacy=dp_sgd:target_epsilon={row.epsilon:g},clip={options.clip:g},delta={options.delta:g}"]


def run_row(row: PrivacyRow, cfg: RunConfig, options: BenchPrivacyOptions, out: Path) -> tuple[dict | None, str]:
    """One row's run; its figures (None when it failed) and its log's tail."""
    shoal = [sys.executable, "-m", "shoal.cli"]
    workload = out / "workload.yaml"
    out.mkdir(parents=True, exist_ok=True)
    workload.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"privacy"}), sort_keys=False))
    if row.kind == "train":
        sets = _privacy_setting(row, options) if row.epsilon is not None else options.none_set
        summary, tail = _run([*shoal, "train", str(workload), "--out", str(out),
                              *(x for s in sets for x in ("--set", s))], out, options.timeout_s)
        if summary is None:
            return None, tail
        privacy = summary.get("privacy") or {}
        return {"final_accuracy": summary["final_accuracy"], "samples_per_s": summary["samples_per_s"],
                "train_time_s": summary["train_time_s"], "epsilon": privacy.get("epsilon"),
                "noise_multiplier": privacy.get("noise_multiplier"), "steps": summary["steps"],
                "wall_time_s": summary["wall_time_s"]}, tail
    if row.kind == "opacus":
        summary, tail = _run([sys.executable, "-m", "shoal.bench.opacus_loop", str(workload), "--epsilon",
                              f"{row.epsilon:g}", "--delta", f"{options.delta:g}", "--clip", f"{options.clip:g}",
                              "--out", str(out)], out, options.timeout_s)
        return summary, tail
    sets = list(options.fl_set)
    if row.epsilon is not None:
        sets += [f"fl.privacy.target_epsilon={row.epsilon:g}", f"fl.privacy.delta={options.delta:g}",
                 *options.fl_privacy]
    summary, tail = _run([*shoal, "fl", "simulate", str(options.fl_config), "--out", str(out),
                          *(x for s in sets for x in ("--set", s))], out, options.timeout_s)
    if summary is None:
        return None, tail
    privacy = summary.get("privacy") or {}
    return {"final_accuracy": summary["final_accuracy"], "wall_time_s": summary["wall_time_s"],
            "epsilon": privacy.get("epsilon"), "noise_multiplier": privacy.get("noise_multiplier"),
            "rounds": summary["rounds"], "metrics": str(out / "metrics.jsonl")}, tail


def run_bench(cfg: RunConfig, rows: list[PrivacyRow], options: BenchPrivacyOptions, *, out: Path, repeat: int = 1,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row ``repeat`` times (interleaved); ``runs.json`` per run, medians and ratios in ``bench.json``."""
    runs: list[dict[str, Any]] = []
    missing = opacus_missing()
    for k in range(repeat):
        for row in rows:
            base = {"label": row.label, "kind": row.kind, "target_epsilon": row.epsilon, "repeat": k}
            if row.kind == "opacus" and missing:
                if k == 0:
                    log(f"{row.label}: skipped: {missing}")
                runs.append({**base, "failed": False, "skipped": missing})
                continue
            started = time.monotonic()
            figures, tail = run_row(row, cfg, options, out / "runs" / row.label / (f"r{k}" if repeat > 1 else ""))
            if figures is None:
                log(f"{row.label}: FAILED after {time.monotonic() - started:.0f} s\n{tail}")
                runs.append({**base, "failed": True})
                continue
            runs.append({**base, **figures, "failed": False})
            spent = "" if figures.get("epsilon") is None else (
                f", epsilon {figures['epsilon']:.3g} (noise {figures['noise_multiplier']:.3g})")
            speed = f", {figures['samples_per_s']:,.0f} samples/s" if figures.get("samples_per_s") else ""
            log(f"{row.label}: accuracy {figures['final_accuracy']:.3f}{spent}{speed}")
            write_json_atomic(out / "runs.json", runs)
    results = medians([r for r in runs if not r.get("skipped")], MEDIAN_KEYS, group_by=("label",),
                      target="final_accuracy")
    results += [r for r in runs if r.get("skipped") and r["repeat"] == 0]
    add_ratios(results)
    write_json_atomic(out / "bench.json", results)
    return results


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Throughput over the ``none`` row's; accuracy against Opacus and FedAvg at the same epsilon."""
    by_label = {r["label"]: r for r in results if not r["failed"] and not r.get("skipped")}
    none, fedavg = by_label.get("none"), by_label.get("fedavg")
    for r in by_label.values():
        if none and r.get("samples_per_s"):
            r["throughput_vs_none"] = r["samples_per_s"] / none["samples_per_s"]
        if r["label"].startswith("dp-sgd-"):
            opacus = by_label.get("opacus-" + r["label"][len("dp-sgd-"):])
            if opacus:
                r["accuracy_vs_opacus"] = r["final_accuracy"] - opacus["final_accuracy"]
        if r["kind"] == "fl" and fedavg and r is not fedavg:
            r["accuracy_vs_fedavg"] = r["final_accuracy"] - fedavg["final_accuracy"]


def plot(results: list[dict[str, Any]], out: Path, target_quantile: float) -> list[Path]:
    """accuracy-vs-epsilon.png (shoal, Opacus, non-private) and, for the DP-FedAvg row, its clip norm per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: list[Path] = []
    done = [r for r in results if not r["failed"] and not r.get("skipped")]
    if any(r["label"].startswith(("dp-sgd-", "opacus-")) for r in done):
        images.append(_accuracy_plot(plt, done, out))
    for r in done:
        if r["kind"] == "fl" and r.get("target_epsilon") is not None and Path(r.get("metrics", "")).is_file():
            rounds = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines() if line.strip()]
            clip = [(x["round"], x["clip_norm"]) for x in rounds if "clip_norm" in x]
            if not clip:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(*zip(*clip), label="clip norm C (noised quantile update)")
            fractions = [(x["round"], 1 - x["clipped_fraction"]) for x in rounds if "clipped_fraction" in x]
            twin = ax.twinx()
            twin.plot(*zip(*fractions), color="tab:orange", alpha=0.5, label="updates within C (share)")
            twin.axhline(target_quantile, color="tab:orange", linestyle="--", label=f"target quantile {target_quantile:g}")
            twin.set_ylim(0, 1)
            ax.set_xlabel("round")
            ax.set_ylabel("clip norm")
            twin.set_ylabel("share of updates within C")
            fig.legend(loc="lower right", bbox_to_anchor=(0.86, 0.16), fontsize="small")
            ax.set_title(f"{r['label']}: adaptive clipping")
            fig.tight_layout()
            images.append(out / f"{r['label']}-clip.png")
            fig.savefig(images[-1], dpi=100)
            plt.close(fig)
    return images


def _accuracy_plot(plt, done: list[dict[str, Any]], out: Path) -> Path:
    """Test accuracy against target epsilon: shoal's DP-SGD, Opacus, and the non-private line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, name in (("dp-sgd-", "shoal dp_sgd"), ("opacus-", "Opacus")):
        points = sorted((r["target_epsilon"], r["final_accuracy"]) for r in done if r["label"].startswith(kind))
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    none = next((r for r in done if r["label"] == "none"), None)
    if none:
        ax.axhline(none["final_accuracy"], linestyle="--", color="grey", label="non-private")
    ax.set_xscale("log")
    epsilons = sorted({r["target_epsilon"] for r in done if r["target_epsilon"] is not None})
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.set_title("DP-SGD: accuracy at each epsilon")
    fig.tight_layout()
    fig.savefig(out / "accuracy-vs-epsilon.png", dpi=100)
    plt.close(fig)
    return out / "accuracy-vs-epsilon.png"
