"""``fl.secure: ckks`` over gRPC: the key files of ``shoal fl keys`` and who may hold which, the round's
server and client sides message by message (replayed, misplaced and wrong messages refused), and a
real federation whose decrypting client drops out after its upload."""

import json
import logging
import os
import stat

import pytest
import torch
import yaml

pytest.importorskip("tenseal", reason="fl.secure=ckks needs TenSEAL: pip install -e '.[he]'")

from shoal.fl import wire  # noqa: E402
from shoal.fl.certs import TlsFiles  # noqa: E402
from shoal.fl.config import load_fl_config  # noqa: E402
from shoal.fl.secure.ckks_keys import FORMAT, make_keys, params_meta, read_key  # noqa: E402
from shoal.fl.secure.ckks_round import Ckks, CkksOptions, CkksSetup  # noqa: E402
from shoal.fl.secure.secagg import ProtocolError  # noqa: E402
from shoal.fl.server import FlServer  # noqa: E402
from shoal.fl.simulate import simulate  # noqa: E402
from shoal.fl.transport import Connection  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.fl_federation import federation  # noqa: E402

CLIENTS = 3
NUMEL = 3000
BODY = """
data: {dataset: digits, batch_size: 16}
model: mlp:hidden=[32]
optimizer: {name: sgd, lr: 0.2, momentum: 0.0}
seed: 37
fl: {clients: 3, clients_per_round: 3, min_clients: 3, rounds: 3, eval_every: 1, deadline_s: 60%s}
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A key pair for rounds of up to 3 clients under the default options: (secret file, public file)."""
    return make_keys(Ckks(CkksOptions()).params(CLIENTS), tmp_path_factory.mktemp("ckks-keys"))


def _mechanisms(keys):
    server, client = Ckks(CkksOptions()), Ckks(CkksOptions())
    server.use_key(keys[1], server=True, clients_per_round=CLIENTS)
    client.use_key(keys[0], server=False, clients_per_round=CLIENTS)
    return server, client


@pytest.mark.processes
def test_shoal_fl_keys_writes_a_secret_file_for_the_clients_and_a_public_one_for_the_server(tmp_path):
    config = tmp_path / "fl.yaml"
    config.write_text(BODY % ", secure: ckks" + f"out: {tmp_path / 'run'}\n")
    made = run_cli("fl", "keys", str(config), "--out", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    assert "rounds of up to 3 clients" in made.stdout
    secret, public = read_key(tmp_path / "keys" / "ckks-secret.key"), read_key(tmp_path / "keys" / "ckks-public.key")
    assert secret.secret and not public.secret and secret.context != public.context
    assert secret.params == public.params == Ckks(CkksOptions()).params(3)
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "ckks-secret.key").st_mode) == 0o600
    again = run_cli("fl", "keys", str(config), "--out", str(tmp_path / "keys"))
    assert again.returncode == 2 and "already holds CKKS keys; pass --force" in again.stderr
    assert read_key(tmp_path / "keys" / "ckks-secret.key").context == secret.context  # nothing replaced


def test_the_server_takes_only_the_public_key_and_a_client_only_the_secret_one(keys, tmp_path):
    secret, public = keys
    with pytest.raises(ValueError, match="holds the secret key: the server must be given only the public one"):
        Ckks(CkksOptions()).use_key(secret, server=True, clients_per_round=CLIENTS)
    with pytest.raises(ValueError, match="is the public key, which cannot decrypt: a client needs ckks-secret.key"):
        Ckks(CkksOptions()).use_key(public, server=False, clients_per_round=CLIENTS)
    with pytest.raises(ValueError, match="was made for value_bits=14, .* fl.secure asks for value_bits=16"):
        Ckks(CkksOptions(value_bits=16)).use_key(public, server=True, clients_per_round=CLIENTS)
    with pytest.raises(ValueError, match="rounds of up to 3 clients, fl.clients_per_round is 4"):
        Ckks(CkksOptions()).use_key(public, server=True, clients_per_round=4)
    # A public context under a header that says secret, bytes that are no key file, no file at all.
    meta, tensors = wire.unpack(public.read_bytes())
    (tmp_path / "relabelled.key").write_bytes(wire.pack({**meta, "secret": True}, tensors))
    with pytest.raises(ValueError, match="its header says secret key, its context lacks the secret key"):
        read_key(tmp_path / "relabelled.key")
    (tmp_path / "junk.key").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.key: not a CKKS key file from `shoal fl keys`"):
        read_key(tmp_path / "junk.key")
    with pytest.raises(ValueError, match="absent.key: cannot read it"):
        read_key(tmp_path / "absent.key")
    assert meta["format"] == FORMAT and meta["params"] == params_meta(read_key(public).params)


@pytest.mark.processes
def test_shoal_fl_server_refuses_ckks_without_the_public_key_before_it_makes_its_database(keys, tmp_path):
    db = tmp_path / "server.db"
    config = tmp_path / "fl.yaml"
    config.write_text(BODY % ", secure: ckks" + yaml.safe_dump(
        {"server": {"address": "127.0.0.1:0", "db": str(db), "insecure": True}, "out": str(tmp_path / "run")}))
    with pytest.raises(ValueError, match=r"fl.secure=ckks: pass --he-key with the public key \(ckks-public.key\)"):
        FlServer(load_fl_config(config), tmp_path / "run")
    done = run_cli("fl", "server", str(config), "--he-key", str(keys[0]))
    assert done.returncode == 2, done.stderr
    assert "server: " in done.stderr and "holds the secret key: the server must be given only the public one" \
        in done.stderr and "Traceback" not in done.stderr
    assert not db.exists()


def _round(keys, participants=tuple(range(CLIENTS))):
    server_side, client_side = _mechanisms(keys)
    weights = torch.zeros(NUMEL)
    setup = server_side.setup(1, list(participants), weights)
    gen = torch.Generator().manual_seed(0)
    updates = {u: torch.randn(NUMEL, generator=gen) * 0.05 for u in participants}
    return server_side, client_side, setup, weights, updates


def test_a_setup_goes_through_a_tasks_config_and_a_bad_one_is_refused(keys):
    _, _, setup, _, _ = _round(keys)
    meta = json.loads(json.dumps(setup.to_meta()))  # as the Task's JSON carries it
    assert CkksSetup.from_meta(meta, numel=NUMEL) == setup
    for bad, message in [({**meta, "extra": 1}, "must have exactly the keys"),
                         ({**meta, "participants": [2, 1, 0]}, "sorted list of distinct"),
                         ({**meta, "min_uploads": 4}, r"min_uploads must be in \[1, 3\]"),
                         ({**meta, "model_hash": "ab"}, "SHA-256 hex digest"),
                         ({**meta, "participants": [0, 1, 2, 3], "min_uploads": 2}, "parameters for 3 clients"),
                         ({**meta, "params": {**meta["params"], "scale_bits": 2}}, "too small for 3 clients"),
                         ({**meta, "params": {**meta["params"], "values_per_slot": "2"}}, "values_per_slot")]:
        with pytest.raises(ProtocolError, match=message):
            CkksSetup.from_meta(bad, numel=NUMEL)
    with pytest.raises(ProtocolError, match="numel 3000, the model has 10"):
        CkksSetup.from_meta(meta, numel=10)


def test_a_client_refuses_another_model_or_parameters_that_are_not_its_keys(keys):
    _, client_side, setup, _, _ = _round(keys)
    with pytest.raises(ProtocolError, match="do not match the model hash the round announced"):
        client_side.client(setup, 0, torch.ones(NUMEL))
    other = Ckks(CkksOptions(value_bits=16)).setup(1, [0, 1, 2], torch.zeros(NUMEL))
    with pytest.raises(ProtocolError, match="the round's CKKS parameters are not this client's key's"):
        client_side.client(other, 0, torch.zeros(NUMEL))
    with pytest.raises(ProtocolError, match="client 5 is not a participant of round 1"):
        client_side.client(setup, 5, torch.zeros(NUMEL))


def test_a_round_message_by_message_refuses_replays_misplaced_and_wrong_messages(keys, caplog):
    server_side, client_side, setup, weights, updates = _round(keys)
    server = server_side.server(setup)
    clients = {u: client_side.client(setup, u, weights) for u in setup.participants}
    uploads = {u: clients[u].upload(updates[u]) for u in setup.participants}
    with pytest.raises(ProtocolError, match="stage 'decrypt' is not open"):
        server.receive("decrypt", 0, {"sum": torch.zeros(NUMEL)})
    with pytest.raises(ProtocolError, match="client 7 has no part in stage 'upload'"):
        server.receive("upload", 7, uploads[0])
    with pytest.raises(ProtocolError, match="ct_sizes add up to"):
        server.receive("upload", 0, {"ct": uploads[0]["ct"][:-1], "ct_sizes": uploads[0]["ct_sizes"]})
    for u in setup.participants:
        server.receive("upload", u, uploads[u])
    with pytest.raises(ProtocolError, match="client 1 already sent its 'upload' message"):
        server.receive("upload", 1, uploads[1])
    with pytest.raises(ProtocolError, match="this client has uploaded already"):
        clients[1].upload(updates[1])
    server.close()
    assert server.holder == 0 and server.ready("upload", 0) and not server.ready("upload", 1)
    meta, summed = server.reply("upload", 0)
    assert meta == {"decrypt": True, "clients": 3}
    with pytest.raises(ProtocolError, match="a sum of 1 clients; the round's sums hold 2 to 3"):
        clients[0].decrypt({"decrypt": True, "clients": 1}, summed)
    with pytest.raises(ProtocolError, match="client 1 has no part in stage 'decrypt'"):
        server.receive("decrypt", 1, {"sum": torch.zeros(NUMEL)})
    # Client 0 answers out of range: refused, and the next client of the sum is asked.
    with pytest.raises(ProtocolError, match="values outside"):
        server.receive("decrypt", 0, {"sum": torch.full((NUMEL,), 10.0)})
    with caplog.at_level(logging.WARNING, logger="shoal.fl"):
        server.close()
    assert "round 1: client 0 did not return the decrypted sum; asking client 1" in caplog.text
    assert server.holder == 1 and server.ready("upload", 1) and not server.ready("upload", 2)
    server.receive("decrypt", 1, clients[1].decrypt(*server.reply("upload", 1)))
    server.close()
    assert server.open_stage is None and server.ready("upload", 2) and server.reply("upload", 2) == ({"done": True}, {})
    total = server.result().total
    assert float((total - sum(updates.values())).abs().max()) <= CLIENTS * setup.params.step
    with pytest.raises(ProtocolError, match="the round is over"):
        server.close()


@pytest.mark.processes
def test_a_ckks_federation_over_grpc_trains_as_plain_fedavg_and_outlives_its_decrypting_client(keys, tmp_path):
    secret, public = keys
    # Seed 37 drops client 0, the first asked to decrypt, after its upload in round 1 and nobody after.
    body = BODY % (', secure: "ckks:stage_timeout_s=3", fleet: {dropout: 0.3, drop_stage: unmask}')
    with federation(tmp_path, body, clients=CLIENTS, server_args=("--he-key", public),
                    client_args=("--he-key", secret)) as fed:
        with Connection(fed.address, TlsFiles.client(tmp_path / "certs", "client0"), retry_for_s=30) as conn:
            stale = {"token": fed.tokens[0], "partition": 0, "round": 99, "stage": "upload"}
            meta, _ = wire.unpack(conn.call("Secure", wire.pack(stale, {"ct": torch.zeros(8, dtype=torch.uint8)})))
            assert "round 99 is not a secure round open for partition 0" in meta["excluded"]
        for p in fed.procs:
            assert p.wait(timeout=240) == 0, fed.logs()
    summary = json.loads((fed.out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["secure"] == "ckks:stage_timeout_s=3.0"
    assert summary["secure_aborted_rounds"] == 0
    rounds = [json.loads(line) for line in (fed.out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] and r["secure_clients"] == 3 for r in rounds)
    server_log = (tmp_path / "server.log").read_text()
    assert "round 1: client 0 did not return the decrypted sum; asking client 1" in server_log
    assert "round 2: client" not in server_log and "stage 'upload') refused: round 99" in server_log
    assert "encrypted update sent (secure aggregation)" in (tmp_path / "client1.log").read_text()
    plain = simulate(load_fl_config(tmp_path / "fl.yaml", ["fl.secure=null", "fl.fleet.dropout=0",
                                                            "fl.fleet.drop_stage=train"],
                                    out=str(tmp_path / "plain")), progress=False)
    assert abs(summary["final_accuracy"] - plain["final_accuracy"]) <= 0.03, (summary, plain)
