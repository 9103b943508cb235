"""The federation server's persistent state, kept in SQL.

A server that restarts must know who may connect, what each client has done,
which round it finished last and the model that round produced. All of it
lives in five tables, through SQLAlchemy, so the default single SQLite file
and a PostgreSQL server (any SQLAlchemy URL) behave the same:

    tokens   name, token_hash, created_at      enrolment tokens, hashes only
    grants   name, partition                   the partitions each token may claim
    clients  name, first_seen, last_seen,      per-client bookkeeping
             updates_accepted, updates_rejected
    rounds   round, completed_at, metrics      one row per finished round
    state    key, value, sha256                the blobs to resume from

Times are Unix seconds (float). ``save_round`` writes a round's row and its
state blobs in one transaction, so a server killed mid-write (SIGKILL
included) comes back with either the previous round or the new one complete,
never a round without its model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from shoal.sql import sql_engine

_metadata = MetaData()
tokens = Table(
    "tokens",
    _metadata,
    Column("name", String(128), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)
grants = Table(
    "grants",
    _metadata,
    Column("name", String(128), primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
)
clients = Table(
    "clients",
    _metadata,
    Column("name", String(128), primary_key=True),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("updates_accepted", Integer, nullable=False, default=0),
    Column("updates_rejected", Integer, nullable=False, default=0),
)
rounds = Table(
    "rounds",
    _metadata,
    Column("round", Integer, primary_key=True, autoincrement=False),
    Column("completed_at", Float, nullable=False),
    Column("metrics", Text, nullable=False),
)
state = Table(
    "state",
    _metadata,
    Column("key", String(256), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("sha256", String(64), nullable=False),
)


class Grant(NamedTuple):
    """Who a valid token was issued to, and the partitions it may claim."""

    name: str
    partitions: frozenset[int]


class ServerStore:
    """Tokens, clients, finished rounds and the resumable state of one server.

    ``url`` is a SQLAlchemy URL (``sqlite:///server.db``,
    ``postgresql+psycopg://...``) or a plain file path, which becomes a SQLite
    database whose parent directories are created. Tables are created if
    missing. Safe to share between the threads of one server.
    """

    def __init__(self, url: str) -> None:
        self.engine = sql_engine(url)
        _metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ServerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_token(self, name: str, partitions: Iterable[int], *, replace: bool = False) -> str:
        """Issue a token for ``name`` holding ``partitions`` and return it; only its hash is stored.

        A request carrying the token may speak for those partitions and no
        other (the server refuses the rest with PERMISSION_DENIED).
        """
        if not name:
            raise ValueError("a token needs a non-empty name")
        held = sorted(set(partitions))
        if not held:
            raise ValueError(f"token {name!r}: name at least one partition it holds (--partition N)")
        for part in held:
            if not isinstance(part, int) or isinstance(part, bool) or part < 0:
                raise ValueError(f"token {name!r}: a partition is a non-negative integer, got {part!r}")
        token = secrets.token_urlsafe(32)
        row = {"name": name, "token_hash": _sha256(token.encode()), "created_at": time.time()}
        try:
            with self.engine.begin() as conn:
                if replace:
                    conn.execute(delete(tokens).where(tokens.c.name == name))
                    conn.execute(delete(grants).where(grants.c.name == name))
                conn.execute(insert(tokens).values(row))
                conn.execute(insert(grants), [{"name": name, "partition": p} for p in held])
        except IntegrityError:
            raise ValueError(f"a token named {name!r} exists; revoke it or pass replace=True") from None
        return token

    def check_token(self, token: str) -> Grant | None:
        """Whom a token was issued to and what it holds, or None if it is unknown or revoked.

        A token issued before tokens held partitions comes back holding none.
        """
        if not isinstance(token, str) or not token:
            return None
        digest = _sha256(token.encode())
        with self.engine.connect() as conn:
            rows = conn.execute(select(tokens.c.name, tokens.c.token_hash)).all()
            found = None
            # Every stored hash is compared in constant time, so the answer's
            # timing says nothing about how close a guess came.
            for name, stored in rows:
                if hmac.compare_digest(stored, digest):
                    found = name
            if found is None:
                return None
            held = conn.execute(select(grants.c.partition).where(grants.c.name == found)).scalars().all()
        return Grant(found, frozenset(held))

    def revoke_token(self, name: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(delete(grants).where(grants.c.name == name))
            return conn.execute(delete(tokens).where(tokens.c.name == name)).rowcount > 0

    def list_tokens(self) -> list[tuple[str, float, list[int]]]:
        """``(name, created_at, partitions)`` for every token, by name."""
        with self.engine.connect() as conn:
            held: dict[str, list[int]] = {}
            for name, part in conn.execute(select(grants.c.name, grants.c.partition).order_by(grants.c.partition)):
                held.setdefault(name, []).append(part)
            rows = conn.execute(select(tokens.c.name, tokens.c.created_at).order_by(tokens.c.name)).all()
        return [(name, created, held.get(name, [])) for name, created in rows]

    def client_seen(self, name: str) -> None:
        with self.engine.begin() as conn:
            _touch(conn, name)

    def client_result(self, name: str, accepted: bool) -> None:
        """Count one update from ``name`` as accepted into the aggregate or rejected."""
        column = clients.c.updates_accepted if accepted else clients.c.updates_rejected
        with self.engine.begin() as conn:
            _touch(conn, name)
            conn.execute(update(clients).where(clients.c.name == name).values({column: column + 1}))

    def clients(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(clients).order_by(clients.c.name))]

    def save_round(self, round: int, metrics: dict[str, Any], blobs: dict[str, bytes]) -> None:
        """Record round ``round`` as finished and make ``blobs`` the state to resume from.

        One transaction: the round's row and the complete new state, or neither.
        """
        row = {"round": round, "completed_at": time.time(), "metrics": json.dumps(metrics)}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(rounds).values(row))
                conn.execute(delete(state))
                if blobs:
                    conn.execute(
                        insert(state),
                        [{"key": k, "value": bytes(v), "sha256": _sha256(v)} for k, v in blobs.items()],
                    )
        except IntegrityError:
            raise ValueError(f"round {round} is already saved") from None

    def last_round(self) -> int:
        """The last finished round, 0 before the first."""
        with self.engine.connect() as conn:
            last = conn.execute(select(rounds.c.round).order_by(rounds.c.round.desc()).limit(1)).scalar()
        return last or 0

    def load_state(self) -> dict[str, bytes]:
        """The blobs of the last saved round; raise ValueError if one was altered."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(state.c.key, state.c.value, state.c.sha256)).all()
        blobs = {}
        for key, value, digest in rows:
            if not hmac.compare_digest(_sha256(value), digest):
                raise ValueError(f"state blob {key!r} does not match its sha256; the database was altered")
            blobs[key] = bytes(value)
        return blobs

    def round_metrics(self) -> list[dict[str, Any]]:
        """``{"round", "completed_at", "metrics"}`` for every finished round, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(rounds).order_by(rounds.c.round)).all()
        return [{"round": r.round, "completed_at": r.completed_at, "metrics": json.loads(r.metrics)} for r in rows]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _touch(conn: Connection, name: str) -> None:
    now = time.time()
    if conn.execute(update(clients).where(clients.c.name == name).values(last_seen=now)).rowcount:
        return
    try:
        # A savepoint, so losing the race to another thread's insert leaves
        # the outer transaction usable.
        with conn.begin_nested():
            conn.execute(
                insert(clients).values(
                    name=name, first_seen=now, last_seen=now, updates_accepted=0, updates_rejected=0
                )
            )
    except IntegrityError:
        conn.execute(update(clients).where(clients.c.name == name).values(last_seen=now))
