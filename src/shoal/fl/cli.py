"""``shoal fl ...``: federated learning from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from shoal.config import ConfigError

fl_app = typer.Typer(help="Federated learning: certificates, tokens, a gRPC server and clients, and simulation.",
                     no_args_is_help=True)
err_console = Console(stderr=True)


def _fail(message: str, what: str = "config error") -> None:
    err_console.print(f"[red]{what}:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(config: Path, set_: list[str], **fields):
    from shoal.fl.config import load_fl_config

    try:
        return load_fl_config(config, set_, **fields)
    except ConfigError as err:
        _fail(str(err))


@fl_app.command("simulate")
def simulate_command(
    config: Path = typer.Argument(..., help="YAML federated config (examples/fl_mnist1d.yaml)"),
    clients: Optional[int] = typer.Option(None, "--clients", help="clients in the federation (fl.clients)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="rounds to run (fl.rounds)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key: --set fl.strategy=fedprox:mu=0.1"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default: the config's 'out')"),
) -> None:
    """Run every client of a federation in this process; writes metrics.jsonl, summary.json, curves.png to OUT."""
    from shoal.fl.simulate import ClientFailed, simulate

    overrides = [*set_]
    if clients is not None:
        overrides.append(f"fl.clients={clients}")
    if rounds is not None:
        overrides.append(f"fl.rounds={rounds}")
    cfg = _load(config, overrides, out=str(out) if out else None)
    try:
        summary = simulate(cfg)
    except ClientFailed as err:
        _fail(str(err), "client failed")
    except ValueError as err:  # e.g. more clients than samples
        _fail(str(err))
    print_fl_summary(summary)


def print_fl_summary(summary: dict) -> None:
    from shoal.cli import _bytes

    table = Table(title=f"shoal federated run: {summary['out']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    target = summary["target_accuracy"]
    reached = summary["rounds_to_target"]
    rows = [
        ("final test accuracy", f"{summary['final_accuracy']:.4f}"),
        ("best test accuracy", f"{summary['best_accuracy']:.4f}"),
        ("target accuracy", "-" if target is None else f"{target:.4f}"),
        ("rounds to target", "not reached" if reached is None
         else f"{reached} ({summary['time_to_target_s']:.1f} s)"),
        ("rounds", str(summary["rounds"])),
        ("clients (per round)", f"{summary['clients']} ({summary['clients_per_round']})"),
        ("strategy / partition / codec", f"{summary['strategy']} / {summary['partition']} / {summary['codec']}"),
        ("model (parameters)", f"{summary['model']} ({summary['parameters']:,})"),
        ("uplink / downlink", f"{_bytes(summary['uplink_bytes'])} / {_bytes(summary['downlink_bytes'])}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("peak memory", _bytes(summary["peak_memory_bytes"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
