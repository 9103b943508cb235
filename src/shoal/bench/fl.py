"""``shoal bench fl``: federated strategies, label skew and uplink compression, in simulation.

Every row is one :func:`shoal.fl.simulate.simulate` run of the same workload
(``examples/bench_fl.yaml``), in this process, one after another, in its own
directory ``DIR/runs/LABEL``:

1. ``centralised``: the same model, from the same initial weights (the same
   :class:`~shoal.fl.federation.Federation` builds it), trained on the union
   of the clients' data with the clients' optimiser, one for the whole run,
   its learning rate decayed to zero on a cosine (``bench.centralised_schedule``:
   the reference is trained as one would train the model centrally), for as
   many sample passes as a FedAvg run of the budget makes (rounds x
   clients_per_round x local_epochs x samples per client). Its "rounds" are
   round-equivalents: the samples one FedAvg round processes.
2. ``fedsgd`` against ``fedavg-iid``: FedSGD runs ``bench.fedsgd_rounds_factor``
   times the round budget, so that "FedAvg needs at least that factor fewer
   rounds" is measured, not extrapolated, when FedSGD never gets there.
3. FedAvg, FedProx and FedAdam at each Dirichlet alpha and IID, at the same
   round budget.
4. FedAvg with each uplink codec of ``bench.codecs`` (IID).

Each row reports ``label``, ``alpha`` (None: IID), ``rounds_to_target``,
``final_accuracy`` and ``uplink_bytes``, and against the FedAvg row of its
partition ``rounds_vs_fedavg`` (its rounds to target / FedAvg's; when it never
reached the target, ``budget / FedAvg's`` with ``rounds_vs_fedavg_bound:
"lower"``), ``accuracy_vs_fedavg`` (points, as a fraction) and
``uplink_reduction`` (FedAvg's uplink bytes / its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.bench.comm import medians
from shoal.config import ConfigError, ScheduleConfig, format_error, gather
from shoal.data.shard import fetch
from shoal.fl.config import FlRunConfig, load_fl_config
from shoal.fl.federation import Federation, RoundTally
from shoal.fl.simulate import simulate
from shoal.metrics.summary import write_json_atomic
from shoal.engine.optim import build_optimizer, lr_factor


class BenchFlOptions(BaseModel):
    """The ``bench:`` section of the workload file: what the rows vary."""

    model_config = ConfigDict(extra="forbid")
    alphas: list[float] = Field([0.1, 0.5], description="Dirichlet label-skew alphas (IID is always run)")
    fedprox: str = Field("fedprox:mu=0.01", description="the FedProx row's strategy spec")
    fedadam: str = Field("fedadam", description="the FedAdam row's strategy spec")
    codecs: list[str] = Field(["topk:ratio=0.05,memory=ef", "int8", "terngrad:bucket=512"],
                              description="uplink codecs for FedAvg rows (one per codec name: rows are labelled "
                              "fedavg-NAME)")
    fedsgd_rounds_factor: int = Field(10, ge=1, description="FedSGD's round budget: fl.rounds x this")
    centralised_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="the centralised reference's learning rate over its run")


@dataclass(frozen=True)
class FlRow:
    label: str
    strategy: str = "fedavg"
    alpha: float | None = None  # Dirichlet alpha; None: IID
    codec: str = "none"
    rounds_factor: int = 1

    @property
    def centralised(self) -> bool:
        return self.strategy == "centralised"

    @property
    def partition(self) -> str:
        return "iid" if self.alpha is None else f"dirichlet:alpha={self.alpha:g}"


def _suffix(alpha: float | None) -> str:
    return "iid" if alpha is None else f"a{alpha:g}"


def all_rows(options: BenchFlOptions) -> list[FlRow]:
    rows = [FlRow("centralised", "centralised"),
            FlRow("fedsgd", "fedsgd", rounds_factor=options.fedsgd_rounds_factor)]
    for alpha in [None, *options.alphas]:
        rows += [FlRow(f"fedavg-{_suffix(alpha)}", "fedavg", alpha),
                 FlRow(f"fedprox-{_suffix(alpha)}", options.fedprox, alpha),
                 FlRow(f"fedadam-{_suffix(alpha)}", options.fedadam, alpha)]
    for codec in options.codecs:
        rows.append(FlRow(f"fedavg-{codec.split(':')[0]}", "fedavg", codec=codec))
    return rows


QUICK_LABELS = ["centralised", "fedsgd", "fedavg-iid", "fedavg-topk", "fedavg-a0.5", "fedprox-a0.5"]
QUICK_OVERRIDES = [
    "data.dataset=digits",
    "data.batch_size=16",
    "model=mlp:hidden=[32]",
    "optimizer.lr=0.1",
    "fl.clients=10",
    "fl.clients_per_round=5",
    "fl.rounds=10",
    "fl.eval_every=5",
    "fl.target_accuracy=0.5",
    "bench.fedsgd_rounds_factor=3",
]
MEDIAN_KEYS = ("final_accuracy", "best_accuracy", "uplink_bytes", "wall_time_s")  # rounds_to_target: medians()
# report.html's table, in this order (labels and formats: shoal.bench.report.FIELDS)
COLUMNS = ["label", "partition", "strategy", "codec", "rounds_to_target", "rounds", "rounds_vs_fedavg",
           "final_accuracy", "accuracy_vs_fedavg", "accuracy_vs_centralised", "uplink_bytes", "uplink_reduction",
           "note"]


def load_bench(config: Path, overrides: list[str]) -> tuple[FlRunConfig, BenchFlOptions]:
    """The workload (an ``FlRunConfig`` plus a ``bench:`` section); ``--set bench.x=...`` reaches the latter."""
    data = gather(config, overrides, {})
    try:
        options = BenchFlOptions.model_validate(data.pop("bench", None) or {})
    except ValidationError as err:
        raise ConfigError("bench: " + format_error(err)) from None
    cfg = load_fl_config(data)
    for spec in (options.fedprox, options.fedadam):  # a bad spec fails here, not after an hour of rows
        load_fl_config(cfg, [f"fl.strategy={spec}"])
    names = [spec.split(":")[0] for spec in options.codecs]
    if len(set(names)) < len(names):
        raise ConfigError(f"bench.codecs: {options.codecs} name a codec twice; rows are labelled fedavg-NAME")
    for spec in options.codecs:
        load_fl_config(cfg, [f"fl.codec={spec}"])
    return cfg, options


def row_config(cfg: FlRunConfig, row: FlRow) -> FlRunConfig:
    return load_fl_config(cfg, [f"fl.strategy={row.strategy}", f"fl.partition={row.partition}",
                                f"fl.codec={row.codec}", f"fl.rounds={cfg.fl.rounds * row.rounds_factor}"])


def train_centralised(cfg: FlRunConfig, out: Path, schedule: str = "cosine") -> dict[str, Any]:
    """The reference: the clients' optimiser on the union of their data, for FedAvg's sample passes.

    Evaluated every ``fl.eval_every`` round-equivalents through the
    federation's own bookkeeping, so its outputs are a federated run's
    (``metrics.jsonl`` in round-equivalents, ``summary.json``, ``curves.png``).
    """
    torch.set_num_threads(1)
    fed = Federation(cfg, out, console=None)
    model, fl, batch = fed.model, cfg.fl, cfg.data.batch_size
    x, y = fetch(fed.data.train, list(range(len(fed.data.train))))
    per_round = fl.clients_per_round * fl.local_epochs * len(y) / fl.clients
    total_steps = math.ceil(fl.rounds * per_round / batch)
    optimizer = build_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    decay = ScheduleConfig(name=schedule)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    seen, step, order, cursor = 0, 0, torch.randperm(len(y), generator=shuffle), 0
    while not fed.done():
        rnd = fed.round + 1
        model.train()
        while seen < rnd * per_round:
            if cursor >= len(y):
                order, cursor = torch.randperm(len(y), generator=shuffle), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            seen += len(idx)
            for group in optimizer.param_groups:
                group["lr"] = cfg.optimizer.lr * lr_factor(decay, step, total_steps)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            step += 1
        fed.weights = fed.flat.get()
        fed.finish_round(rnd, RoundTally())
    return fed.close(strategy="centralised", samples=seen)


def run_row(cfg: FlRunConfig, row: FlRow, out: Path, options: BenchFlOptions) -> dict[str, Any]:
    common = {"label": row.label, "strategy": row.strategy, "alpha": row.alpha, "partition": row.partition,
              "codec": row.codec, "target_accuracy": cfg.fl.target_accuracy, "metrics": str(out / "metrics.jsonl")}
    try:
        if row.centralised:
            summary = train_centralised(cfg, out, options.centralised_schedule)
        else:
            summary = simulate(row_config(cfg, row), out=out, progress=False)
    except Exception as err:  # one failed row must not lose the others
        return {**common, "failed": True, "error": f"{type(err).__name__}: {err}", "rounds": None,
                "rounds_to_target": None, "final_accuracy": None, "uplink_bytes": None, "wall_time_s": None}
    return {**common, "rounds": summary["rounds"], "rounds_to_target": summary["rounds_to_target"],
            **{k: summary[k] for k in MEDIAN_KEYS}, "failed": False}


def compare(rows: list[dict[str, Any]]) -> None:
    """Add the comparisons with the FedAvg row of the same partition and with centralised training."""
    rows = [r for r in rows if not r["failed"]]
    fedavg = {r["partition"]: r for r in rows if r["strategy"] == "fedavg" and r["codec"] == "none"}
    central = next((r for r in rows if r["label"] == "centralised"), None)
    for r in rows:
        if central is not None and r is not central:
            r["accuracy_vs_centralised"] = r["final_accuracy"] - central["final_accuracy"]
        base = fedavg.get(r["partition"])
        if base is None or r is base or r["label"] == "centralised":
            continue
        r["accuracy_vs_fedavg"] = r["final_accuracy"] - base["final_accuracy"]
        if r["codec"] != "none" and r["uplink_bytes"]:
            r["uplink_reduction"] = base["uplink_bytes"] / r["uplink_bytes"]
        ours, theirs = r["rounds_to_target"], base["rounds_to_target"]
        if theirs is None:
            continue
        if ours is not None:
            r["rounds_vs_fedavg"] = ours / theirs
        else:
            r["rounds_vs_fedavg"] = r["rounds"] / theirs
            r["rounds_vs_fedavg_bound"] = "lower"
            r["note"] = (f"did not reach {r['target_accuracy']} in {r['rounds']} rounds: needs more than "
                         f"{r['rounds'] / theirs:.1f}x FedAvg's {theirs}")


def run_bench(cfg: FlRunConfig, rows: list[FlRow], options: BenchFlOptions, *, out: Path, repeat: int = 1,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row ``repeat`` times (seeds 0..repeat-1, interleaved); ``runs.json`` per run, medians in ``bench.json``."""
    runs: list[dict[str, Any]] = []
    for k in range(repeat):
        seeded = load_fl_config(cfg, [f"seed={k}"]) if repeat > 1 else cfg
        for row in rows:
            run_dir = out / "runs" / row.label / (f"r{k}" if repeat > 1 else "")
            result = {**run_row(seeded, row, run_dir, options), "repeat": k}
            runs.append(result)
            write_json_atomic(out / "runs.json", runs)
            if result["failed"]:
                log(f"{row.label}: FAILED: {result['error']}")
                continue
            ttt = result["rounds_to_target"]
            log(f"{row.label}: accuracy {result['final_accuracy']:.3f}, rounds to target "
                f"{'not reached' if ttt is None else ttt} of {result['rounds']}, uplink "
                f"{result['uplink_bytes'] / 1e6:,.1f} MB, {result['wall_time_s']:.0f} s")
    results = medians(runs, MEDIAN_KEYS, group_by=("label",), target="rounds_to_target")
    compare(results)
    write_json_atomic(out / "bench.json", results)
    return results
