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
            cursor.close()
    return engine
