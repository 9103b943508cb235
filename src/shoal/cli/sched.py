"""``shoal sched simulate``: a cluster trace replayed through the platform's scheduling policies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shoal.cli.common import CONTEXT_SETTINGS, fail, log_to, wide_console

sched_app = typer.Typer(help="Scheduling policies: replay a cluster trace through them.",
                        context_settings=CONTEXT_SETTINGS)

DEFAULT_TRACE = Path("../shared/data/philly-jobs.csv")


@sched_app.command("simulate")
def sched_simulate(
    trace: Path = typer.Option(DEFAULT_TRACE, help="a Philly-format CSV: timestamp,duration,num_gpus,gpu_time,cluster"),
    policy: str = typer.Option("fifo,las,las-bounded", help="policies to compare, comma-separated; options after "
                               "a colon (las:thresholds=[1800]); ratios are against the first"),
    gpus: int = typer.Option(520, min=1, help="GPUs in the simulated cluster"),
    per_node: int = typer.Option(8, min=0, help="GPUs per node: smaller jobs go on one node, larger ones on whole "
                                 "nodes; 0: one pool with no node boundaries"),
    window: Optional[str] = typer.Option(None, help="FIRST:LAST submission days, both included "
                                         "(2017-10-01:2017-10-14); default: the whole trace"),
    load: str = typer.Option("1.0", help="load factors, comma-separated: arrivals sped up by each"),
    restart_cost: float = typer.Option(60.0, min=0, help="seconds a preempted job pays again when it resumes"),
    high_priority: float = typer.Option(0.1, help="share of the jobs given priority 1 (a seeded draw: the trace has "
                                        "no priorities), for the priority policy"),
    check: bool = typer.Option(False, "--check", help="check the gang invariant after every decision (slower)"),
    out: Path = typer.Option(Path("runs/sched-simulate"), "--out", "-o", help="writes bench.json, report.html "
                             "and one JCT CDF plot per load"),
) -> None:
    """Replay a trace's arrivals and durations through each policy, the same policy objects a service runs:
    gangs (all of a job's GPUs or none), a restart cost per preemption, jobs as large as a node on whole nodes.

    Reports per policy and load the mean, p50, p95 and p99 job completion time, makespan, queueing delay,
    utilisation, preemptions per job and the worst per-queue mean slowdown (the Philly trace's queues are its
    virtual clusters).
    """
    import sys

    from shoal.bench import report
    from shoal.bench.secure import parse_list
    from shoal.metrics.summary import write_json_atomic
    from shoal.platform import simulate
    from shoal.platform.cluster import Cluster
    from shoal.registry import POLICIES, load_builtins

    load_builtins(POLICIES)
    try:
        specs = split_specs(policy)
        policies = {spec: POLICIES.resolve(spec) for spec in specs}
        loads = parse_list(load, float, "--load")
        if any(not 0 < x <= 100 for x in loads):
            raise ValueError(f"--load: every factor must be in (0, 100], got {load}")
        span = simulate.parse_window(window) if window else None
        if not trace.is_file():
            raise ValueError(f"--trace: {trace} is not a file")
        jobs = simulate.with_priorities(simulate.read_philly(trace, span), high_priority)
        per_node = per_node or gpus
        if not any(Cluster(gpus, per_node).could_ever_fit(g) for g in {j.gpus for j in jobs}):
            raise ValueError(f"--gpus: no job of the trace fits on {gpus} GPUs ({per_node} a node)")
    except ValueError as err:
        fail(str(err))
    console = wide_console(160)
    log = log_to(console)
    log(f"{len(jobs)} jobs from {trace} on {gpus} GPUs ({'one pool' if per_node == gpus else f'{per_node} a node'})")
    out.mkdir(parents=True, exist_ok=True)
    rows, images = simulate.run_all(lambda spec: policies[spec].target(policies[spec].options), specs, jobs,
                                    gpus=gpus, per_node=per_node, loads=loads, restart_cost=restart_cost, out=out,
                                    check=check, log=log)
    for row in rows:
        if row["refused"]:
            log(f"{row['label']}: {row['refused']} jobs asked for more GPUs than the cluster can place; refused")
    write_json_atomic(out / "bench.json", {"rows": rows, "trace": str(trace), "window": window, "gpus": gpus,
                                           "per_node": per_node, "restart_cost": restart_cost})
    page = report.write_html(rows, out, images, "shoal sched simulate", "shoal " + " ".join(sys.argv[1:]),
                             simulate.COLUMNS)
    console.print(f"wrote {out / 'bench.json'}, {page} and {len(images)} plots")


def split_specs(text: str) -> list[str]:
    """``fifo,las:thresholds=[1800,7200],min_run_s=0,drf`` -> ``fifo``, ``las:...,min_run_s=0``, ``drf``: an
    item with ``=`` and no policy name before a colon is one more option of the policy before it."""
    from shoal.registry import split_top_level

    specs: list[str] = []
    for item in split_top_level(text):
        name = item.split(":", 1)[0]
        if "=" in name:
            if not specs:
                raise ValueError(f"--policy: {text!r} starts with an option, not a policy name")
            specs[-1] += ("," if ":" in specs[-1] else ":") + item
        elif item:
            specs.append(item)
        else:
            raise ValueError(f"--policy: {text!r} has an empty entry")
    if len(set(specs)) != len(specs):
        raise ValueError(f"--policy: {text!r} names the same policy twice")
    return specs
