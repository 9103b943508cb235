"""A real federation on loopback for tests: certificates, one token a partition, a ``shoal fl server``
process and one ``shoal fl client`` process a partition, all with mutual TLS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shoal.fl.certs import make_certs
from shoal.fl.store import ServerStore
from tests.test_fl_grpc import _cli, _wait


@dataclass
class Federation:
    root: Path
    config: Path
    out: Path
    address: str = ""
    tokens: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def logs(self) -> str:
        """Every process's log, for an assertion's message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


@contextmanager
def federation(tmp_path: Path, body: str, *, clients: int, client_args: tuple[str, ...] = (),
               server_args: tuple[str, ...] = ()) -> Iterator[Federation]:
    """Start a server for the YAML ``body`` (data/model/optimizer/fl; server and out are added) and
    ``clients`` clients, partition i for client i; every process still running at the end is killed.
    The certificates and tokens are made through the Python API (tests/test_fl_grpc.py runs the CLI's)."""
    certs, db, out = tmp_path / "certs", tmp_path / "server.db", tmp_path / "run"
    config = tmp_path / "fl.yaml"
    config.write_text(f"{body}\nserver: {{address: \"127.0.0.1:0\", db: {db}, certs: {certs}}}\nout: {out}\n")
    make_certs(certs, hosts=["localhost", "127.0.0.1"], clients=[f"client{i}" for i in range(clients)])
    with ServerStore(str(db)) as store:
        tokens = [store.add_token(f"client{i}", [i]) for i in range(clients)]
    fed = Federation(tmp_path, config, out, tokens=tokens)
    try:
        fed.procs.append(_cli("fl", "server", config, *server_args, log=tmp_path / "server.log"))
        fed.address = _wait(lambda: (out / "server.json").exists()
                            and json.loads((out / "server.json").read_text())["address"], 60, "the server to listen")
        fed.procs += [_cli("fl", "client", config, "--server", fed.address, "--token", tokens[i], "--partition", i,
                           "--name", f"client{i}", *client_args, log=tmp_path / f"client{i}.log")
                      for i in range(clients)]
        yield fed
    finally:
        for p in fed.procs:
            if p.poll() is None:
                p.kill()
