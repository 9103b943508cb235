"""``shoal job ...``: the client of ``shoal serve`` (:class:`shoal.platform.client.Client`).

The service and token come from ``--url``/``--token``, else ``SHOAL_URL``/``SHOAL_TOKEN``, else the
local service's admin token file (``~/.shoal/serve/admin.token``) where it is readable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from shoal.cli.common import CONTEXT_SETTINGS, fail, wide_console

job_app = typer.Typer(help="Submit and manage jobs of a shoal serve service.", context_settings=CONTEXT_SETTINGS,
                      no_args_is_help=True)

URL = typer.Option(None, "--url", envvar="SHOAL_URL", help="the service (default http://127.0.0.1:8470)")
TOKEN = typer.Option(None, "--token", envvar="SHOAL_TOKEN", help="your API token (default: the local admin's "
                     "token file, where readable)")


def _client(url: Optional[str], token: Optional[str]):  # type: ignore[no-untyped-def]
    from shoal.platform.client import DEFAULT_URL, Client

    if not token:
        path = Path("~/.shoal/serve/admin.token").expanduser()
        if path.is_file() and os.access(path, os.R_OK):
            token = path.read_text().strip()
    if not token:
        fail("no token: pass --token or set SHOAL_TOKEN (an admin makes one with shoal job user-add)", "shoal")
    return Client(url or DEFAULT_URL, token)


def _call(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    from shoal.platform.client import ServiceError

    try:
        return fn(*args, **kwargs)
    except ServiceError as err:
        # 422/403/404/409: what was asked cannot be done (exit 2); 0: no service; others: the service failed.
        fail(str(err), "shoal", 2 if err.status in (2, 400, 401, 403, 404, 409, 422) else 1)


@job_app.command("submit")
def submit(spec: Path = typer.Argument(..., help="a job spec (YAML): kind, config or command, workers, resources"),
           url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Queue a job; prints its id. A train config given as a path is read relative to the spec."""
    job = _call(_client(url, token).submit, spec)
    print(f"job {job['id']} {job['state']}" + ("" if job.get("created", True) else " (already submitted)"))


@job_app.command("list")
def list_jobs(state: Optional[str] = typer.Option(None, help="pending, running, stopping, done, failed, "
                                                   "cancelled or active"),
              everyone: bool = typer.Option(False, "--all", help="admin: every user's jobs"),
              limit: int = typer.Option(100, min=1, max=10_000), as_json: bool = typer.Option(False, "--json"),
              url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Your jobs (an admin's --all: everyone's), oldest first, with why each pending one waits."""
    rows = _call(_client(url, token).list, state=state, everyone=everyone, limit=limit)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("id", "name", "user", "state", "workers", "CPUs", "pos", "attained", "note", box=None)
    for r in rows:
        note = r.get("waiting") or r.get("reason") or ""
        table.add_row(str(r["id"]), r["name"], r["user"], r["state"], str(r["workers"] or ""), r["cpus"] or "",
                      str(r.get("position") or ""), f"{r['attained_cpu_s']:.0f} s", note)
    wide_console(140).print(table)


@job_app.command("show")
def show(job: int, url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """One job: its state, spec and every event, as JSON."""
    print(json.dumps(_call(_client(url, token).show, job), indent=1))


@job_app.command("logs")
def logs(job: int, follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """The job's output (all its runs, appended)."""
    client = _client(url, token)
    if not follow:
        offset = 0
        while True:
            part = _call(client.logs, job, offset)
            sys.stdout.write(part["text"])
            if not part["text"]:
                return
            offset = part["offset"]
    def stream() -> None:
        for text in client.follow(job):
            sys.stdout.write(text)
            sys.stdout.flush()

    _call(stream)


@job_app.command("cancel")
def cancel(job: int, url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Cancel a job (a running train job checkpoints first)."""
    print(f"job {job} {_call(_client(url, token).cancel, job)['state']}")


@job_app.command("resize")
def resize(job: int, workers: int = typer.Argument(..., min=1), url: Optional[str] = URL,
           token: Optional[str] = TOKEN) -> None:
    """Run a train job on WORKERS workers: it checkpoints and resumes at the new size."""
    print(f"job {job} {_call(_client(url, token).resize, job, workers)['state']}, to {workers} workers")


@job_app.command("priority")
def priority(job: int, value: int = typer.Argument(..., min=-100, max=100), url: Optional[str] = URL,
             token: Optional[str] = TOKEN) -> None:
    """Set a job's priority (above 0: admins only)."""
    _call(_client(url, token).priority, job, value)
    print(f"job {job} priority {value}")


@job_app.command("user-add")
def user_add(name: str, role: str = typer.Option("user", help="user or admin"),
             quota_cpus: Optional[int] = typer.Option(None, min=1, help="most CPUs its running jobs hold together"),
             url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Admin: make a user; prints its token (shown once, stored hashed)."""
    print(_call(_client(url, token).add_user, name, role, quota_cpus=quota_cpus)["token"])


@job_app.command("node")
def node(url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """The machine the service schedules: CPUs, memory, GPUs, use, jobs by state."""
    print(json.dumps(_call(_client(url, token).node), indent=1))
