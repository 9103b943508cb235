"""``shoal serve``: the job service for one shared machine (see :mod:`shoal.platform.service`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shoal.cli.common import fail

DEFAULT_STATE = Path("~/.shoal/serve")


def serve(
    state: Path = typer.Option(DEFAULT_STATE, help="where the service keeps its database, admin.token and each "
                               "job's directory (log, run, checkpoints)"),
    db: Optional[str] = typer.Option(None, help="a SQLAlchemy URL (postgresql+psycopg://...) or a SQLite file "
                                     "(default: STATE/jobs.db)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback unless told otherwise)"),
    port: int = typer.Option(8470, min=1, max=65535),
    policy: str = typer.Option("las", help="the scheduling policy: fifo, priority, drf, las, las-bounded "
                               "(options after a colon: drf:weights={a: 2})"),
    share_by: str = typer.Option("user", help="whose share DRF and the quotas count: user or queue"),
    cpus: Optional[int] = typer.Option(None, min=1, help="CPUs to schedule (default: the cores this process "
                                       "may use; more than that shares them)"),
    memory_mb: Optional[int] = typer.Option(None, min=16, help="memory to schedule in MiB (default: the machine's)"),
    gpus: Optional[int] = typer.Option(None, min=0, help="GPUs to schedule (default: CUDA's device count)"),
    cgroups: bool = typer.Option(True, "--cgroups/--no-cgroups", help="hold each job to its CPUs and memory in a "
                                 "cgroup (v1 or v2, detected; without root it runs without)"),
    grace_s: float = typer.Option(60.0, min=1, help="seconds a stopped job has to checkpoint before it is killed"),
    grow_after_s: float = typer.Option(30.0, min=0, help="seconds an elastic job runs before it may grow"),
) -> None:
    """Run the job service: a queue of training jobs and commands on this machine, gang-scheduled by a policy.

    On first start it makes an admin and writes its token to STATE/admin.token (mode 0600). Jobs keep
    running when the service stops; the next start adopts them. API docs at http://HOST:PORT/docs.
    """
    from shoal.platform.node import discover
    from shoal.platform.service import build, run

    try:
        node = discover(cpus, memory_mb, gpus)
        service = build(state, db=db, policy=policy, node=node, share_by=share_by, cgroups=cgroups,
                        grace_s=grace_s, grow_after_s=grow_after_s)
    except ValueError as err:
        fail(str(err))
    agent = service.agent
    print(f"shoal serve: http://{host}:{port} ({agent.node.slots} CPUs, {agent.node.memory_mb} MiB, "
          f"{agent.node.gpus} GPUs; policy {policy}; cgroups {agent.cgroups.mode or 'off'}); "
          f"admin token in {service.state / 'admin.token'}", flush=True)
    run(service, host, port)
