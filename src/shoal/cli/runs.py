"""``shoal runs ...``: finished runs, read back from their OUT directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from shoal.cli.common import CONTEXT_SETTINGS, fail

runs_app = typer.Typer(help="Finished runs: compare their summaries and curves.", no_args_is_help=True,
                       context_settings=CONTEXT_SETTINGS)

PLOT_FORMATS = (".png", ".svg", ".pdf")


@runs_app.command("compare")
def compare_command(
    dirs: list[Path] = typer.Argument(..., help="run directories: the OUT of shoal train or shoal fl runs"),
    out: Path = typer.Option(Path("runs-compare.png"), "--out", "-o", help="the overlay plot of the runs' curves"),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="the test metric to compare (accuracy, "
                                         "perplexity, ...; default: the one the runs' summaries name, else accuracy)"),
) -> None:
    """A table of the runs' summary.json figures, a column per run, and one plot of their test metric and
    training loss against step (or round)."""
    from shoal.metrics.compare import RunError, compare_table, load_runs, pick_metric, plot_runs

    if out.suffix.lower() not in PLOT_FORMATS:
        fail(f"--out {out}: the plot is written as {', '.join(PLOT_FORMATS)}", "runs compare")
    try:
        runs = load_runs(dirs)
        metric = pick_metric(runs, metric)
    except RunError as err:
        fail(str(err), "runs compare")
    console = Console()
    console.print(compare_table(runs, metric))
    plot_runs(runs, metric, out)
    console.print(f"curves: {out}", highlight=False, markup=False)
