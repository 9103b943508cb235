import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Generated datasets go to a per-session cache; spawned workers inherit the variable.
    os.environ["SHOAL_CACHE"] = str(tmp_path_factory.mktemp("shoal-cache"))
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``shoal ARGS`` as a user would, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``shoal ARGS`` in this interpreter; what :func:`run_cli` returns, without a fresh one.

    A fresh interpreter spends seconds importing torch (and, for a job, starting its fork
    server) before the command does anything: this one has both. stdout and stderr are what
    the command itself prints; a job's workers write to this process's own streams, which
    are not in them. An exception that escapes the command is appended to stderr as its
    traceback, as the interpreter would print it.
    """
    import contextlib
    import traceback

    from typer.testing import CliRunner

    from shoal.cli import app

    with contextlib.chdir(cwd or ROOT):
        result = CliRunner().invoke(app, list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["shoal", *args], result.exit_code, result.stdout, stderr)


def small_config(out: Path, **changes) -> dict:
    """A seconds-long run: an MLP on scikit-learn digits."""
    cfg = {
        "seed": 0,
        "workers": 2,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": "mlp:hidden=[32]",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "constant"},
        "train": {"steps": 40, "eval_every": 20},
        "out": str(out),
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg[section], field: value}
        else:
            cfg[key] = value
    return cfg


# The stores are plain SQLAlchemy: the same tests run against PostgreSQL where
# SHOAL_TEST_POSTGRES_URL names a server whose user may create databases
# (postgresql+psycopg://user:password@host/dbname; psycopg installed).
POSTGRES = os.environ.get("SHOAL_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "nested" / "server.db")  # a path: the store makes its folder
        return
    if not POSTGRES:
        pytest.skip("SHOAL_TEST_POSTGRES_URL is not set")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(POSTGRES)
    name = f"shoal_test_{os.getpid()}_{random.randrange(10**9)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        engine.dispose()
