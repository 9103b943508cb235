"""One way to open a SQL database for shoal's stores: a SQLAlchemy URL, or a file path for SQLite."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event

# Seconds a writer waits for SQLite's lock before giving up, rather than
# failing at once when another connection is mid-transaction.
SQLITE_BUSY_TIMEOUT_S = 30.0


def sql_engine(url: str | Path, *, wal: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///file.db``, ``postgresql+psycopg://...``); a plain path becomes a
    SQLite file whose parent directories are created. ``wal``: SQLite in write-ahead-log mode, so that
    readers never wait for a writer (a service answering requests while its scheduler writes)."""
    if "://" not in str(url):
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    sqlite = str(url).startswith("sqlite")
    engine = create_engine(str(url), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S} if sqlite else {})
    if sqlite and wal:
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent across a crash at this level
            # No checkpoint inside a writer's commit (it would hold every other writer up while it syncs the
            # file); the owner checkpoints from a thread of its own (:func:`checkpoint`).
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()
    return engine


def checkpoint(engine: Engine) -> None:
    """Copy a SQLite write-ahead log back into the database without blocking writers (PASSIVE)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
