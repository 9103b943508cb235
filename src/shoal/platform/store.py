"""The job service's state, in SQL (a SQLite file by default, any SQLAlchemy URL such as PostgreSQL).

    users    name, role (admin | user), token_hash, quota_cpus     API tokens, hashes only
    jobs     one row per job: its spec, state and every figure the scheduler keeps
    events   job, time, text                                       what happened to each job, in order

A job moves ``pending -> running -> done | failed | cancelled``; a running job that is preempted or
resized goes ``stopping -> pending`` and runs again from its checkpoint. Every change is one
transaction, so a service killed at any instant (SIGKILL included) comes back to rows that each
say one true state. ``submit`` with a ``client_key`` is idempotent per user: a client that
retries after a lost answer gets the job it already made, never a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from shoal.platform.spec import JobSpec
from shoal.sql import sql_engine

PENDING, RUNNING, STOPPING, DONE, FAILED, CANCELLED = "pending", "running", "stopping", "done", "failed", "cancelled"
ACTIVE = (PENDING, RUNNING, STOPPING)
ROLES = ("admin", "user")
TOKEN_CACHE_S = 10.0  # a known token is looked up again after this long (users are never changed, only added)

_metadata = MetaData()
users = Table(
    "users", _metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("quota_cpus", Integer, nullable=True),  # most CPUs its running jobs may hold together; None: no limit
    Column("created_at", Float, nullable=False),
)
jobs = Table(
    "jobs", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(64), ForeignKey("users.name"), nullable=False),
    Column("client_key", String(64), nullable=True),
    Column("name", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("queue", String(64), nullable=False),
    Column("spec", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("workers", Integer, nullable=True),  # its size now (running) or at its last run
    Column("want_workers", Integer, nullable=True),  # a resize asked for this size
    Column("cpus", String(256), nullable=True),  # the CPU ids it holds, "0,1"
    Column("gpus", String(256), nullable=True),  # the GPU ids it holds
    Column("submitted", Float, nullable=False),
    Column("first_start", Float, nullable=True),
    Column("run_start", Float, nullable=True),
    Column("finished", Float, nullable=True),
    Column("attained", Float, nullable=False, default=0.0),  # CPU-seconds run before run_start
    Column("preemptions", Integer, nullable=False, default=0),
    Column("attempt", Integer, nullable=False, default=0),
    Column("pid", Integer, nullable=True),
    Column("stop", String(16), nullable=True),  # why it is stopping: preempt | resize | cancel
    Column("stop_at", Float, nullable=True),  # when it was asked to stop
    Column("exit_code", Integer, nullable=True),
    Column("reason", Text, nullable=True),
    Column("pending_since", Float, nullable=True),  # when it last became pending
    Column("changed", Float, nullable=False),  # when the row last changed: the scheduler reads what did
    UniqueConstraint("user", "client_key", name="one_job_per_client_key"),
)
Index("jobs_by_state", jobs.c.state)
Index("jobs_by_user", jobs.c.user, jobs.c.id)
Index("jobs_by_change", jobs.c.changed)
events = Table(
    "events", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("text", Text, nullable=False),
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Refused(ValueError):
    """A request the store will not carry out; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class JobStore:
    """Users, jobs and events of one service; safe to share between its threads."""

    def __init__(self, url: str) -> None:
        self.engine = sql_engine(url, wal=True)
        _metadata.create_all(self.engine)
        # SQLite takes one writer at a time and makes the others sleep and retry (in steps of up to 100 ms);
        # taking turns on a lock in this process instead keeps a burst of submits in milliseconds.
        self._tokens: dict[str, tuple[dict[str, Any], float]] = {}  # token hash -> (user, until), see user_for
        self._one_writer = threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()

    def close(self) -> None:
        self.engine.dispose()

    # Users and tokens.

    def add_user(self, name: str, role: str = "user", *, quota_cpus: int | None = None) -> str:
        """Make a user and return its new API token (only its hash is kept)."""
        if role not in ROLES:
            raise Refused(f"role: {role!r} is not one of {', '.join(ROLES)}", 422)
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise Refused(f"name: {name!r} is not 1-64 letters, digits, '-', '_' or '.'", 422)
        if quota_cpus is not None and quota_cpus < 1:
            raise Refused(f"quota_cpus: {quota_cpus} is not a positive number of CPUs", 422)
        token = secrets.token_urlsafe(32)
        try:
            with self._one_writer, self.engine.begin() as conn:
                conn.execute(insert(users).values(name=name, role=role, token_hash=token_hash(token),
                                                  quota_cpus=quota_cpus, created_at=time.time()))
        except IntegrityError:
            raise Refused(f"a user named {name!r} exists", 409) from None
        return token

    def user_for(self, token: str) -> dict[str, Any] | None:
        """The user a token belongs to, or None for an unknown one."""
        if not token:
            return None
        digest = token_hash(token)
        known = self._tokens.get(digest)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.token_hash == digest)).mappings().first()
        if row is None:
            return None
        user = dict(row)
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[digest] = (user, time.monotonic() + TOKEN_CACHE_S)
        return user

    def users(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(users.c.name, users.c.role, users.c.quota_cpus)).mappings().all()
        return [dict(r) for r in rows]

    def has_admin(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(users).where(users.c.role == "admin")).scalar_one() > 0

    # Jobs.

    def submit(self, user: str, spec: JobSpec, client_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Queue a job; returns (its row, whether it is new). A second submit with the same ``client_key``
        returns the first job."""
        row = {"user": user, "client_key": client_key, "name": spec.name, "kind": spec.kind, "queue": spec.queue,
               "spec": spec.model_dump_json(), "priority": spec.priority, "state": PENDING,
               "submitted": time.time(), "attained": 0.0, "preemptions": 0, "attempt": 0}
        try:
            with self._one_writer, self.engine.begin() as conn:
                # Stamped once the lock is held: the scheduler rereads rows by this time.
                row["submitted"] = row["changed"] = row["pending_since"] = time.time()
                job = conn.execute(insert(jobs).values(row)).inserted_primary_key[0]
                conn.execute(insert(events).values(job=job, at=row["submitted"], text=f"submitted by {user}"))
        except IntegrityError:
            if client_key is None:
                raise
            with self.engine.connect() as conn:
                found = conn.execute(select(jobs).where(jobs.c.user == user, jobs.c.client_key == client_key)
                                     ).mappings().first()
            if found is None:
                raise
            return dict(found), False
        row["id"] = job
        return {c.name: row.get(c.name) for c in jobs.c}, True

    def job(self, job: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job)).mappings().first()
        return dict(row) if row is not None else None

    def jobs(self, *, user: str | None = None, states: tuple[str, ...] | None = None, limit: int | None = None,
             after: int = 0, spec: bool = True) -> list[dict[str, Any]]:
        """Jobs in id order, from ``after`` on; ``user`` None: everyone's; ``spec``: with their specs."""
        query = select(*[c for c in jobs.c if spec or c.name != "spec"]).where(jobs.c.id > after).order_by(jobs.c.id)
        if user is not None:
            query = query.where(jobs.c.user == user)
        if states is not None:
            query = query.where(jobs.c.state.in_(states))
        if limit is not None:
            query = query.limit(limit)
        return self._rows(query)

    def active(self) -> list[dict[str, Any]]:
        """The pending, running and stopping jobs, in id order, without their specs (see :meth:`specs`)."""
        return self._without_spec(jobs.c.state.in_(ACTIVE))

    def changed_since(self, since: float) -> list[dict[str, Any]]:
        """Every job changed at or after ``since`` (any state), without its spec: what the scheduler rereads."""
        return self._without_spec(jobs.c.changed >= since)

    def _without_spec(self, where: Any) -> list[dict[str, Any]]:
        return self._rows(select(*[c for c in jobs.c if c.name != "spec"]).where(where).order_by(jobs.c.id))

    def _rows(self, query: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            result = conn.execute(query)
            names = list(result.keys())
            return [dict(zip(names, r)) for r in result]

    def specs(self, ids: list[int]) -> dict[int, JobSpec]:
        out: dict[int, JobSpec] = {}
        with self.engine.connect() as conn:
            for at in range(0, len(ids), 500):  # SQLite's limit on bound parameters
                rows = conn.execute(select(jobs.c.id, jobs.c.spec).where(jobs.c.id.in_(ids[at:at + 500])))
                out.update({job: JobSpec.model_validate_json(text) for job, text in rows})
        return out

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: n for state, n in rows}

    def change(self, job: int, note: str | None = None, *, where_state: tuple[str, ...] | None = None,
               **values: Any) -> bool:
        """Set ``values`` on a job (only while its state is one of ``where_state``, when given) and log
        ``note``; returns whether the row changed."""
        query = update(jobs).where(jobs.c.id == job)
        if where_state is not None:
            query = query.where(jobs.c.state.in_(where_state))
        with self._one_writer, self.engine.begin() as conn:
            changed = conn.execute(query.values(**values, changed=time.time())).rowcount > 0
            if changed and note:
                conn.execute(insert(events).values(job=job, at=time.time(), text=note))
        return changed

    def events(self, job: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(events.c.at, events.c.text).where(events.c.job == job)
                                .order_by(events.c.id)).mappings().all()
        return [dict(r) for r in rows]


def spec_of(row: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate_json(row["spec"])

