"""``shoal serve``'s HTTP API (FastAPI; OpenAPI at ``/docs``): jobs, users, the node.

Every request but ``/healthz`` carries ``Authorization: Bearer TOKEN``; the token names one user
(stored as a SHA-256 hash), whose role is ``admin`` or ``user``. A user sees and touches only its own
jobs (another user's job answers 404, as one that does not exist), may not raise a priority above 0
(priorities above 0 are the admins' to give) and runs within its CPU quota. A bad spec answers 422
with one line naming the field; a request for more than the machine has answers 422 saying what it has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from shoal.config import ConfigError
from shoal.platform.agent import Agent
from shoal.platform.pool import held_cpus, needs
from shoal.platform.shim import LOG
from shoal.platform.spec import JobSpec, check_run_config
from shoal.platform.store import ACTIVE, CANCELLED, DONE, FAILED, PENDING, JobStore, Refused, spec_of

DASHBOARD = Path(__file__).with_name("dashboard.html")
LOG_CHUNK = 1 << 20  # bytes of log one request returns at most


class Submit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: JobSpec
    client_key: str | None = Field(None, min_length=1, max_length=64, description="makes a retried submit "
                                   "idempotent: the same key returns the job the first submit made")


class Resize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(ge=1, le=1024)


class SetPriority(BaseModel):
    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=-100, le=100)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: str = Field("user", pattern="^(admin|user)$")
    quota_cpus: int | None = Field(None, ge=1)


def create_app(store: JobStore, agent: Agent) -> FastAPI:
    app = FastAPI(title="shoal serve", description="A job queue for one shared machine: gang scheduling under "
                  "FIFO, priority with preemption, DRF or least-attained-service, elastic training jobs.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for item in err.errors():
            where = ".".join(str(p) for p in item["loc"] if p != "body")
            msg = str(item["msg"]).removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{where}: {msg}" if where else msg)
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Refused)
    async def _refused(_request: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    def caller(request: Request) -> dict[str, Any]:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a token is required: Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        user = store.user_for(token.strip())
        if user is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return user

    def admin(user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        if user["role"] != "admin":
            raise HTTPException(403, "only an admin may do that")
        return user

    def own_job(job: int, user: dict[str, Any]) -> dict[str, Any]:
        row = store.job(job)
        if row is None or (user["role"] != "admin" and row["user"] != user["name"]):
            raise HTTPException(404, f"no job {job}")
        return row

    def view(row: dict[str, Any], positions: dict[int, int] | None = None) -> dict[str, Any]:
        out = {k: row[k] for k in ("id", "name", "user", "queue", "kind", "state", "priority", "workers", "cpus",
                                   "gpus", "submitted", "first_start", "run_start", "finished", "preemptions",
                                   "attempt", "exit_code", "reason")}
        run = row["run_start"] if row["state"] in ("running", "stopping") else None
        out["attained_cpu_s"] = row["attained"] + (held_cpus(row) * (time.time() - run) if run else 0.0)
        if row["state"] == PENDING:
            out["waiting"] = agent.why_waiting(row["id"])
            if positions is not None:
                out["position"] = positions.get(row["id"])
        return out

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        """The dashboard page; it asks for a token and reads everything through this API."""
        return Response(DASHBOARD.read_text(), media_type="text/html")

    @app.get("/node/history")
    def node_history(_user: dict[str, Any] = Depends(caller)) -> JSONResponse:
        return JSONResponse(list(agent.history))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/jobs", status_code=201)
    def submit(body: Submit, user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        spec = body.spec
        if spec.priority > 0 and user["role"] != "admin":
            raise Refused(f"priority: {spec.priority} is above 0; only an admin gives priorities above 0", 403)
        check_fits(spec, agent)
        fewest = spec.fewest * spec.resources.cpus
        if user["quota_cpus"] is not None and fewest > user["quota_cpus"]:
            raise Refused(f"resources.cpus: the job needs {fewest} CPUs at its fewest workers; {user['name']}'s "
                          f"quota is {user['quota_cpus']}", 422)
        if spec.kind == "train":
            if not isinstance(spec.config, dict):
                raise Refused("config: send the run config itself, a mapping (shoal job submit reads a path "
                              "for you)", 422)
            try:
                check_run_config(spec)
            except ConfigError as err:
                raise Refused(f"config: {err}", 422) from None
        row, new = store.submit(user["name"], spec, body.client_key)
        agent.poke()
        # Returned as a response, not a dict: FastAPI would run its generic encoder over it first.
        return JSONResponse({**view(row), "created": new}, status_code=201 if new else 200)

    @app.get("/jobs")
    def list_jobs(state: str | None = Query(None, description="pending, running, stopping, done, failed, "
                                            "cancelled, or active (the first three)"),
                  everyone: bool = Query(False, alias="all", description="admin: every user's jobs"),
                  limit: int = Query(100, ge=1, le=10_000), after: int = Query(0, ge=0),
                  user: dict[str, Any] = Depends(caller)) -> list[dict[str, Any]]:
        states = ACTIVE if state == "active" else (state,) if state else None
        if states is not None and any(s not in (*ACTIVE, DONE, FAILED, CANCELLED) for s in states):
            raise Refused(f"state: {state!r} is not a job state", 422)
        who = None if everyone and user["role"] == "admin" else user["name"]
        rows = store.jobs(user=who, states=states, limit=limit, after=after, spec=False)
        return JSONResponse([view(r, agent.positions) for r in rows])

    @app.get("/jobs/{job}")
    def show(job: int, user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        row = own_job(job, user)
        return {**view(row, agent.positions), "spec": spec_of(row).model_dump(), "events": store.events(job)}

    @app.get("/jobs/{job}/logs")
    def logs(job: int, offset: int = Query(0, ge=0), user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        row = own_job(job, user)
        path = agent.job_dir(job) / LOG
        data = b""
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(LOG_CHUNK)
        return {"offset": offset + len(data), "text": data.decode(errors="replace"), "state": row["state"]}

    @app.get("/jobs/{job}/metrics")
    def metrics(job: int, user: dict[str, Any] = Depends(caller)) -> list[dict[str, Any]]:
        own_job(job, user)
        return _metrics(agent.job_dir(job) / "run" / "metrics.jsonl")

    @app.post("/jobs/{job}/cancel")
    def cancel(job: int, user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        own_job(job, user)
        agent.cancel(job)
        return view(store.job(job))  # type: ignore[arg-type]

    @app.post("/jobs/{job}/resize")
    def resize(job: int, body: Resize, user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        row = own_job(job, user)
        spec = spec_of(row)
        if spec.kind != "train":
            raise Refused("workers: only kind=train jobs resize (they resume from a checkpoint)", 422)
        if row["state"] not in ACTIVE:
            raise Refused(f"job {job} is {row['state']}: nothing to resize", 409)
        if spec.elastic and not spec.fewest <= body.workers <= spec.most:
            raise Refused(f"workers: {body.workers} is outside this job's min_workers..max_workers "
                          f"({spec.fewest}..{spec.most})", 422)
        check_fits(spec.model_copy(update={"workers": body.workers, "min_workers": None, "max_workers": None}),
                   agent)
        agent.resize(job, body.workers)
        return view(store.job(job))  # type: ignore[arg-type]

    @app.post("/jobs/{job}/priority")
    def priority(job: int, body: SetPriority, user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        own_job(job, user)
        if body.priority > 0 and user["role"] != "admin":
            raise Refused(f"priority: {body.priority} is above 0; only an admin gives priorities above 0", 403)
        store.change(job, f"priority set to {body.priority} by {user['name']}", priority=body.priority)
        agent.poke()
        return view(store.job(job))  # type: ignore[arg-type]

    @app.get("/node")
    def node(_user: dict[str, Any] = Depends(caller)) -> dict[str, Any]:
        held = [r for r in store.jobs(states=("running", "stopping"))]
        used = sum(held_cpus(r) for r in held)
        return {"cpus": agent.node.slots, "memory_mb": agent.node.memory_mb, "gpus": agent.node.gpus,
                "cpus_used": used, "policy": type(agent.policy).__name__.lower(),
                "cgroups": agent.cgroups.mode, "jobs": store.counts(),
                "last_pass_ms": round(agent.pass_s[-1] * 1000, 2) if agent.pass_s else None,
                "last_decision_ms": round(agent.decide_s[-1] * 1000, 2) if agent.decide_s else None}

    @app.post("/users", status_code=201)
    def add_user(body: NewUser, _admin: dict[str, Any] = Depends(admin)) -> dict[str, Any]:
        token = store.add_user(body.name, body.role, quota_cpus=body.quota_cpus)
        return {"name": body.name, "role": body.role, "quota_cpus": body.quota_cpus, "token": token}

    @app.get("/users")
    def list_users(_admin: dict[str, Any] = Depends(admin)) -> list[dict[str, Any]]:
        return store.users()

    return app


def check_fits(spec: JobSpec, agent: Agent) -> None:
    """A job that this machine could never hold, even empty, is refused up front."""
    node, fewest = agent.node, spec.fewest
    memory, gpus = needs(spec, fewest)
    cpus = fewest * spec.resources.cpus
    for what, need, have in (("cpus", cpus, node.slots), ("memory_mb", memory, node.memory_mb),
                             ("gpus", gpus, node.gpus)):
        if need > have:
            raise Refused(f"resources.{what}: the job needs {need} at {fewest} workers; this machine has {have}",
                          422)


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the line being written
    return out
