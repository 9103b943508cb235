"""The ``shoal`` command line: the root app, and each command group from its own module.

``shoal train`` (train.py), ``list`` (components.py), ``plan`` (plan.py), ``compress`` (compress.py),
``bench ...`` (bench.py), ``netem ...`` (netem.py), ``fl ...`` (fl.py), ``runs ...`` (runs.py), ``sched ...`` (sched.py), ``serve`` (serve.py), ``job ...`` (job.py); what
they share is in common.py. Every command imports what it runs (torch among it) inside its own
function, so that ``shoal --help`` and ``import shoal.cli`` stay fast.
"""

from __future__ import annotations

import os
import sys

import typer

from shoal.cli import bench, components, compress, fl, job, netem, plan, runs, sched, serve, train
from shoal.cli.common import CONTEXT_SETTINGS

app = typer.Typer(
    help="shoal: distributed deep-learning training on PyTorch's distributed engine, made cheaper.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT_SETTINGS,
)
# Registration order is the order ``shoal --help`` lists them in.
app.command("train")(train.train)
app.command("list")(components.list_components)
app.command("plan")(plan.plan_command)
app.command("compress")(compress.compress_command)
app.add_typer(bench.bench_app, name="bench")
app.add_typer(netem.netem_app, name="netem")
app.add_typer(fl.fl_app, name="fl")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(sched.sched_app, name="sched")
app.command("serve")(serve.serve)
app.add_typer(job.job_app, name="job")


def main() -> None:
    # Like ``python -m``, let entry points name modules in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        sys.exit(app())
    except KeyboardInterrupt:  # Ctrl-C before a command took over the signal (e.g. while it imports)
        print("shoal: interrupted", file=sys.stderr)
        sys.exit(130)
