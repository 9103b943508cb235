"""DP-FedAvg's privacy ledger across a server crash, over the real gRPC stack with mutual TLS: the
server is SIGKILLed between aggregating a round (its noise drawn, its epsilon spent in memory, its
metrics line written) and storing it (``server.kill_before_commit``), then started again on the same
database. The ledger is stored in the round's own transaction, so it is neither reset nor spent twice
and the killed round runs once more."""

import json
import signal
from pathlib import Path

import pytest

from shoal.fl import wire
from shoal.fl.store import ServerStore
from tests.conftest import run_cli
from tests.test_fl_grpc import _cli, _last_round, _wait

ROUNDS, KILLED = 6, 4
TARGET_EPSILON, DELTA = 8.0, 1e-5
# Four partitions, two a round (q = 0.5 for the accountant); only two clients run, so that the two
# client processes, both servers and the test share a small machine. Both are selected every round.
CLIENTS, PER_ROUND = 4, 2


def _ledger_steps(db: Path) -> int:
    """The privacy rounds the stored state says were spent (DP-FedAvg's ``privacy_rounds``)."""
    with ServerStore(str(db)) as store:
        _, strategy = wire.unpack(store.load_state()["strategy"])
    return int(strategy["privacy_rounds"][0])


def _stored_rounds(db: Path) -> list[int]:
    with ServerStore(str(db)) as store:
        return [r["round"] for r in store.round_metrics()]


@pytest.fixture
def private_federation(tmp_path):
    certs, db = tmp_path / "certs", tmp_path / "server.db"
    cfg = tmp_path / "fl.yaml"
    cfg.write_text(f"""
data: {{dataset: digits, batch_size: 16}}
model: mlp:hidden=[32]
optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
fl:
  clients: {CLIENTS}
  clients_per_round: {PER_ROUND}
  min_clients: {PER_ROUND}
  rounds: {ROUNDS}
  eval_every: 1
  deadline_s: 30
  privacy: {{target_epsilon: {TARGET_EPSILON}, delta: {DELTA}, clip: 1.0}}
server: {{address: "127.0.0.1:0", db: {db}, certs: {certs}, kill_before_commit: {KILLED}}}
out: {tmp_path / "run"}
""")
    names = [f"client{i}" for i in range(PER_ROUND)]
    assert run_cli("fl", "certs", "--out", str(certs), *[f"--client={n}" for n in names]).returncode == 0
    with ServerStore(str(db)) as store:
        tokens = {i: store.add_token(name, [i]) for i, name in enumerate(names)}
    procs = []
    yield tmp_path, cfg, tokens, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.processes
def test_a_server_killed_between_aggregation_and_commit_neither_resets_nor_double_spends_the_budget(
        private_federation):
    from shoal.privacy.accountant import epsilon

    tmp, cfg, tokens, procs = private_federation
    db, out = tmp / "server.db", tmp / "run"
    server = _cli("fl", "server", cfg, "-v", log=tmp / "server1.log")
    procs.append(server)
    address = _wait(lambda: (out / "server.json").exists() and json.loads((out / "server.json").read_text())["address"],
                    90, "the server to listen")
    clients = [_cli("fl", "client", cfg, "--server", address, "--token", tokens[i], "--partition", i,
                    "--name", f"client{i}", log=tmp / f"client{i}.log") for i in range(PER_ROUND)]
    procs.extend(clients)

    # Killed by its own fault hook, after aggregating round KILLED and before storing it.
    assert server.wait(timeout=180) == -signal.SIGKILL, (tmp / "server1.log").read_text()[-3000:]
    assert json.loads((out / "fault.json").read_text())["kill_before_commit"] == KILLED
    assert _stored_rounds(db) == list(range(1, KILLED))
    assert _ledger_steps(db) == KILLED - 1  # round KILLED's spend died with the process
    written = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert written == list(range(1, KILLED + 1))  # it was aggregated and logged: the kill came after

    restarted = _cli("fl", "server", cfg, "-v", "--address", address, log=tmp / "server2.log")
    procs.append(restarted)
    assert restarted.wait(timeout=240) == 0, (tmp / "server2.log").read_text()[-3000:]
    for i, client in enumerate(clients):
        assert client.wait(timeout=60) == 0, (tmp / f"client{i}.log").read_text()[-2000:]

    assert f"resuming after round {KILLED - 1}" in (tmp / "server2.log").read_text()
    assert _stored_rounds(db) == list(range(1, ROUNDS + 1))
    assert _ledger_steps(db) == ROUNDS  # one step per stored round: not reset, the killed one counted once
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, ROUNDS + 1))  # round KILLED run again, once
    assert all(r["aggregated"] and r["participating"] == PER_ROUND for r in lines)
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    sigma, q = privacy["noise_multiplier"], privacy["sampling_rate"]
    assert q == PER_ROUND / CLIENTS and privacy["noise_calibrated"] and privacy["steps"] == ROUNDS
    assert privacy["epsilon"] == pytest.approx(epsilon(sigma, q, ROUNDS, DELTA))
    assert privacy["epsilon"] <= TARGET_EPSILON and not privacy["stopped_by_budget"]
    for r in lines:  # each round's epsilon is that of its place in the run, the redone one too
        assert r["epsilon"] == pytest.approx(epsilon(sigma, q, r["round"], DELTA))
