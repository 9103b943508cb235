"""``shoal plan``: predicted step time and memory of each parallel layout, and the one to use."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from shoal.cli.common import config_errors
from shoal.config import load_config


def plan_command(
    config: Path = typer.Argument(..., help="the run's YAML config (model, data, batch size, optimizer)"),
    workers: int = typer.Option(4, "--workers", "-n", min=1, help="workers to plan for"),
    rate: str = typer.Option("10gbit", help="each worker's link, e.g. 1gbit, 100mbit"),
    latency: str = typer.Option("50us", help="per-message latency, e.g. 50us, 1ms"),
    memory: Optional[str] = typer.Option(None, help="memory per worker, e.g. 16GiB (layouts above it do not fit; "
                                  "default: the config's max_memory_per_worker, if it sets one)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the plan as JSON here"),
) -> None:
    """Predict step time and memory of data-parallel (each codec), pipeline and hybrid layouts, and recommend one.

    Predictions come from this machine's measured per-layer forward+backward
    times (two batch sizes), parameter and activation sizes, and the
    alpha-beta model of the link. Also prints the best layout at 64, 256 and
    1024 workers on 1, 10 and 100 Gbit/s links.
    """
    from shoal.netem.costmodel import Link
    from shoal.netem.testbed import rate_bits
    from shoal.parallel.plan import parse_bytes, parse_seconds
    from shoal.parallel.planner import make_plan, print_plan

    with config_errors(ValueError):
        cfg = load_config(config, set_)
        link = Link(alpha_s=parse_seconds(latency), beta_bytes_per_s=rate_bits(rate) / 8)
        cap = parse_bytes(memory) if memory else None
    with config_errors(ValueError):
        report = make_plan(cfg, workers=workers, link=link, cap=cap)
    print_plan(report, Console())
    if out is not None:
        from shoal.metrics.summary import write_json_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
