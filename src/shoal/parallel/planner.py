"""``shoal plan``: measure the config's model here, predict every layout, recommend one."""

from __future__ import annotations

from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from shoal.config import RunConfig
from shoal.netem.costmodel import Link
from shoal.parallel.plan import candidates, moments_per_parameter, recommend
from shoal.parallel.costs import model_costs
from shoal.parallel.profile import update_seconds_per_parameter
from shoal.engine.optim import build_optimizer

SCALES = (64, 256, 1024)
MAX_STAGES = 8  # pipelines deeper than this are not profiled for
RATES = {"1gbit": 1e9, "10gbit": 1e10, "100gbit": 1e11}


def config_cap(cfg: RunConfig) -> float | None:
    """The memory per worker the config itself allows (``pipeline:max_memory_per_worker=...``), if any."""
    cap = getattr(cfg.strategy.options, "max_memory_per_worker", None)
    return float(cap) if cap is not None else None


def make_plan(cfg: RunConfig, *, workers: int, link: Link, cap: float | None) -> dict[str, Any]:
    """Every layout's predictions for ``cfg`` on ``workers`` workers and ``link``.

    ``cap``: memory per worker (layouts above it do not fit); None takes the
    config's own cap (:func:`config_cap`), if it has one."""
    from shoal.data import build_dataset
    from shoal.models import build_model

    cap_from = "--memory" if cap is not None else None
    if cap is None and config_cap(cfg) is not None:
        cap, cap_from = config_cap(cfg), "strategy.max_memory_per_worker"
    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    batch = cfg.data.batch_size
    inputs = data.train.tensors[0][: max(batch, 4)] if hasattr(data.train, "tensors") else \
        torch.stack([data.train[i][0] for i in range(max(batch, 4))])
    per_param = update_seconds_per_parameter(model, lambda params: build_optimizer(cfg.optimizer, params))
    # A model that is not a layer sequence is cut where the pipeline strategy
    # would cut it (torch.export split points), into enough pieces for every P.
    # Enough pieces for interleaved layouts too (2 chunks per rank).
    costs, pieces = model_costs(model, inputs, max_stages=2 * min(workers, MAX_STAGES),
                                update_s_per_param=per_param)
    states = moments_per_parameter(cfg.optimizer.name, getattr(cfg.optimizer, "momentum", 0.0))
    layouts = candidates(costs, workers, batch, link, states, cap)
    best, reason = recommend(layouts)
    scaled = []
    for n in SCALES:
        for rate, bits in RATES.items():
            wide = Link(alpha_s=link.alpha_s, beta_bytes_per_s=bits / 8)
            options = candidates(costs, n, batch, wide, states, cap)
            data_best = min((o for o in options if o.kind == "data"), key=lambda o: o.step_s)
            pick, _ = recommend(options)
            scaled.append({"workers": n, "rate": rate, "best": pick.label if pick else None,
                           "step_s": pick.step_s if pick else None, "best_data_parallel": data_best.label,
                           "data_parallel_step_s": data_best.step_s})
    return {
        "model": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters()),
        "layers": len(costs), "pieces": pieces, "batch_per_worker": batch, "workers": workers,
        "link": {"latency_s": link.alpha_s, "mbit_per_s": link.mbit_per_s}, "memory_cap_bytes": cap, "memory_cap_from": cap_from,
        "layouts": [layout.as_dict() for layout in layouts],
        "recommended": best.label if best else None, "reason": reason, "scaled": scaled,
    }


def _ms(seconds: float) -> str:
    """Milliseconds in at most 8 characters (``1,167.2``, ``36.25``)."""
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 100 else f"{ms:.2f}"


def layouts_table(report: dict[str, Any]) -> Table:
    """Every layout's predictions, readable at 80 columns: numbers are never cut,
    the layout's label wraps."""
    link = report["link"]
    cap = report.get("memory_cap_bytes")
    table = Table(title=f"{report['model']} ({report['parameters']:,} parameters, {report['layers']} layers), "
                        f"{report['workers']} workers x batch {report['batch_per_worker']}, "
                        f"{link['mbit_per_s']:,.0f} Mbit/s, {link['latency_s'] * 1e6:,.0f} us"
                        + (f", memory cap {cap / 2**20:,.1f} MiB ({report.get('memory_cap_from')})"
                           if cap else ""),
                  caption="times in ms per step; comm+idle: communication and pipeline idle time",
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.add_column("layout", ratio=1, min_width=12, overflow="fold")
    for column in ("step", "compute", "comm+idle", "bubble", "MiB", "wire MB", "fits"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report["layouts"]:
        table.add_row(row["label"], _ms(row["step_s"]), _ms(row["compute_s"]), _ms(row["comm_s"]),
                      f"{row['bubble_fraction']:.2f}", f"{row['memory_bytes'] / 2**20:,.1f}",
                      f"{row['wire_bytes'] / 1e6:,.2f}", "yes" if row["fits"] else "[red]no[/]")
    return table


def scale_table(report: dict[str, Any]) -> Table:
    """The best layout at 64, 256 and 1024 workers on each link rate."""
    scaled = Table(title="best layout at scale (same per-worker batch, same latency)", box=box.SIMPLE_HEAD)
    scaled.add_column("workers", justify="right", no_wrap=True)
    for rate in RATES:
        scaled.add_column(rate, ratio=1)
    for n in SCALES:
        cells = [r for r in report["scaled"] if r["workers"] == n]
        scaled.add_row(str(n), *(f"{c['best']} ({c['step_s'] * 1e3:,.1f} ms)" if c["best"] else "none fits"
                                 for c in cells))
    return scaled


def print_plan(report: dict[str, Any], console: Console) -> None:
    console.print(layouts_table(report))
    console.print(f"[bold]recommended:[/] {report['recommended'] or 'none'} — {report['reason']}")
    console.print(scale_table(report))
