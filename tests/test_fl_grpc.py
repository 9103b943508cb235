"""A real federation on loopback: a server and 4 client processes over gRPC
with mutual TLS, each with its own certificate and a token for its own
partition (plus a fifth client played by the test), a client with a
certificate from another CA — a refused client, a rejected malformed update,
a client killed mid-training, and the server killed and restarted
mid-round, whose re-run round gets its clients."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shoal.fl import wire
from shoal.fl.certs import TlsFiles
from shoal.fl.store import ServerStore
from shoal.fl.transport import Connection
from tests.conftest import ROOT, run_cli

ROUNDS = 24


def _cli(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", *map(str, args)], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _last_round(db: Path) -> int:
    if not db.exists():
        return 0
    with ServerStore(str(db)) as store:
        return store.last_round()


@pytest.fixture
def federation(tmp_path):
    certs, db = tmp_path / "certs", tmp_path / "server.db"
    cfg = tmp_path / "fl.yaml"
    cfg.write_text(f"""
data: {{dataset: digits, batch_size: 16}}
model: mlp:hidden=[32]
optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
fl: {{clients: 5, clients_per_round: 4, min_clients: 2, rounds: {ROUNDS}, eval_every: 1, deadline_s: 4}}
server: {{address: "127.0.0.1:0", db: {db}, certs: {certs}}}
out: {tmp_path / "run"}
""")
    names = [f"client{i}" for i in range(4)] + ["tester"]
    assert run_cli("fl", "certs", "--out", str(certs), *[f"--client={n}" for n in names]).returncode == 0
    with ServerStore(str(db)) as store:
        tokens = {i: store.add_token(f"client{i}", [i]) for i in range(4)}
    added = run_cli("fl", "token", "add", "tester", "--partition", "4", "--config", str(cfg))
    assert added.returncode == 0, added.stderr
    tokens[4] = added.stdout.strip()
    procs: list[subprocess.Popen] = []
    yield tmp_path, cfg, tokens, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.processes
def test_a_federation_survives_bad_clients_a_dead_client_and_a_server_restart(federation):
    tmp, cfg, tokens, procs = federation
    db, out = tmp / "server.db", tmp / "run"
    server = _cli("fl", "server", cfg, "-v", log=tmp / "server1.log")
    procs.append(server)
    address = _wait(lambda: (out / "server.json").exists() and json.loads((out / "server.json").read_text())["address"],
                    60, "the server to listen")
    # A client whose certificate another CA signed is refused by TLS (it retries, then gives up);
    # checked while the server waits for its first clients.
    assert run_cli("fl", "certs", "--out", str(tmp / "other"), "--client", "client").returncode == 0
    result = run_cli("fl", "client", str(cfg), "--server", address, "--token", tokens[4], "--partition", "4",
                     "--certs", str(tmp / "other" / "client"), "--retry-for", "2")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stderr

    clients = {i: _cli("fl", "client", cfg, "--server", address, "--token", tokens[i], "--partition", i,
                       "--name", f"client{i}", log=tmp / f"client{i}.log") for i in range(4)}
    procs.extend(clients.values())

    # A client with a wrong token is refused and the refusal is logged.
    refused = run_cli("fl", "client", str(cfg), "--server", address, "--token", "not-a-token", "--partition", "4",
                      "--name", "tester")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr

    # A client with a valid token sends an update of the wrong shape: rejected, the round goes on.
    with Connection(address, TlsFiles.client(tmp / "certs" / "tester"), retry_for_s=30) as conn:
        me = {"token": tokens[4], "partition": 4}
        conn.call("Join", wire.pack(me, {}))
        while True:
            meta, tensors = wire.unpack(conn.call("Task", wire.pack({**me, "after": 0}, {})))
            if "round" in meta and "weights" in tensors:
                break
        reply, _ = wire.unpack(conn.call("Submit", wire.pack(
            {**me, "round": meta["round"], "num_examples": 10, "loss": 0.0}, {"p0": torch.zeros(7)})))
    assert not reply["accepted"] and "tensor 0 is torch.float32 (7,)" in reply["reason"]

    # One client dies mid-training; the others go on without it.
    _wait(lambda: _last_round(db) >= 4, 120, "round 4")
    clients[1].send_signal(signal.SIGKILL)

    # The server dies mid-round: the test's client holds round R open by not answering it, and the
    # server is killed once another client's update for R was accepted. It is started again on the
    # same database and port.
    _wait(lambda: _last_round(db) >= 8, 120, "round 8")
    with Connection(address, TlsFiles.client(tmp / "certs" / "tester"), retry_for_s=30) as conn:
        me, after, incarnation = {"token": tokens[4], "partition": 4}, 0, None
        while True:  # until this client is selected for a round
            meta, _ = wire.unpack(conn.call("Task", wire.pack({**me, "after": after, "incarnation": incarnation},
                                                              {})))
            incarnation = meta["incarnation"]
            if "round" in meta:
                held = meta["round"]
                break
            after = _last_round(db)
    _wait(lambda: any(f"round {held}: loss" in (tmp / f"client{i}.log").read_text() for i in (0, 2, 3)),
          60, f"a client's update for round {held}")
    server.send_signal(signal.SIGKILL)
    server.wait()
    stopped_at = _last_round(db)
    assert stopped_at == held - 1  # the server died in round R, not after it
    # It waits for the three live clients, so that every one of them is selected for the re-run round.
    restarted = _cli("fl", "server", cfg, "-v", "--address", address, "--set", "fl.min_clients=3",
                     log=tmp / "server2.log")
    procs.append(restarted)
    assert restarted.wait(timeout=240) == 0, (tmp / "server2.log").read_text()[-3000:]
    for i in (0, 2, 3):
        assert clients[i].wait(timeout=30) == 0, (tmp / f"client{i}.log").read_text()[-2000:]

    log1, log2 = (tmp / "server1.log").read_text(), (tmp / "server2.log").read_text()
    assert "refused" in log1 and "invalid or revoked token" in log1
    assert "rejected: tensor 0" in log1
    assert f"resuming after round {stopped_at}" in log2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["resumed_from_round"] == stopped_at
    assert summary["final_accuracy"] > 0.8
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, ROUNDS + 1))  # no round lost or repeated
    assert sum(r["rejected"] for r in lines) == 1 and [4] in [r["rejected_clients"] for r in lines]
    assert any(1 in r["dropped_clients"] for r in lines if r["round"] > 4)  # the killed client's rounds
    assert all(r["participating"] >= 2 for r in lines if r["aggregated"])
    # The round the restarted server opened again was offered again to the clients selected for it,
    # though they had fetched it from the server that died.
    rerun = lines[stopped_at]
    assert rerun["dropped_clients"] == [] and rerun["participating"] == rerun["selected"] == 3, rerun
