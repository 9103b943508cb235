"""Federated-learning plumbing: wire format, certificates, server store, transport."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from sqlalchemy import text

from shoal.fl.certs import TlsFiles, make_certs
from shoal.fl.store import Grant, ServerStore
from shoal.fl.transport import Connection, RpcFailed, peer_identity, serve
from shoal.fl.wire import WireError, pack, payload_bytes, unpack


def _raw(header: dict, payload: bytes = b"", *, magic: bytes = b"SHFL", version: int = 1) -> bytes:
    h = json.dumps(header).encode()
    return magic + bytes([version]) + struct.pack("<I", len(h)) + h + payload


def _entry(name="w", dtype="float32", shape=(2,), offset=0, nbytes=8) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


def test_wire_round_trip_keeps_dtypes_shapes_and_meta():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "i64": torch.tensor([2**40, -1]),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 7),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    meta = {"round": 3, "client": "alice", "metrics": {"loss": 0.25}, "ids": [1, 2]}

    got_meta, got = unpack(pack(meta, tensors))

    assert got_meta == meta
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert got["scalar"].dim() == 0


def test_wire_tensors_own_writable_memory():
    data = bytearray(pack({}, {"w": torch.ones(4)}))

    _, got = unpack(bytes(data))
    got["w"].add_(1)  # must not warn or fail: writable
    data[-1] ^= 0xFF  # must not change the tensor: copied out

    assert torch.equal(got["w"], torch.full((4,), 2.0))
    assert payload_bytes(got) == 16


def test_wire_meta_must_be_a_dict_when_packing():
    with pytest.raises(TypeError):
        pack([1, 2], {})
    with pytest.raises(TypeError, match="dtype"):
        pack({}, {"c": torch.zeros(2, dtype=torch.complex64)})


GOOD = _raw({"meta": {}, "tensors": [_entry()]}, bytes(8))

MALFORMED = [
    ("empty", b"", "too short"),
    ("truncated prefix", GOOD[:6], "too short"),
    ("bad magic", b"NOPE" + GOOD[4:], "bad magic"),
    ("bad version", GOOD[:4] + b"\x02" + GOOD[5:], "version"),
    ("header past end", GOOD[:5] + struct.pack("<I", 10_000) + GOOD[9:], "past the end"),
    ("header over 1 MiB", GOOD[:5] + struct.pack("<I", (1 << 20) + 1) + GOOD[9:], "over the limit"),
    ("garbage json", b"SHFL\x01" + struct.pack("<I", 5) + b"{nope", "not valid UTF-8 JSON"),
    ("not utf-8", b"SHFL\x01" + struct.pack("<I", 2) + b"\xff\xfe", "not valid UTF-8 JSON"),
    ("deeply nested json", b"SHFL\x01" + struct.pack("<I", 100_000) + b"[" * 100_000, "not valid UTF-8 JSON"),
    ("header is a list", _raw([1, 2]), "exactly the keys"),
    ("meta not an object", _raw({"meta": [1], "tensors": []}), "meta must be a JSON object"),
    ("tensors not a list", _raw({"meta": {}, "tensors": {}}), "tensors must be a JSON list"),
    ("entry missing key", _raw({"meta": {}, "tensors": [{"name": "w"}]}), "entry 0"),
    ("bad dtype", _raw({"meta": {}, "tensors": [_entry(dtype="object")]}, bytes(8)), "unknown dtype"),
    ("negative shape", _raw({"meta": {}, "tensors": [_entry(shape=(-2,))]}, bytes(8)), "non-negative"),
    ("bool in shape", _raw({"meta": {}, "tensors": [_entry(shape=(True,), nbytes=4)]}, bytes(4)), "non-negative"),
    ("huge shape", _raw({"meta": {}, "tensors": [_entry(shape=(0, 2**63), nbytes=0)]}), "huge"),
    ("nbytes mismatch", _raw({"meta": {}, "tensors": [_entry(nbytes=6)]}, bytes(6)), "needs 8"),
    (
        "overlapping offsets",
        _raw({"meta": {}, "tensors": [_entry("a"), _entry("b", offset=4)]}, bytes(16)),
        "overlaps",
    ),
    ("gap before tensor", _raw({"meta": {}, "tensors": [_entry(offset=4)]}, bytes(12)), "gap"),
    ("tensor past end", _raw({"meta": {}, "tensors": [_entry()]}, bytes(4)), "past the 4-byte payload"),
    ("trailing bytes", GOOD + b"x", "1 trailing bytes"),
    (
        "duplicate names",
        _raw({"meta": {}, "tensors": [_entry("a"), _entry("a", offset=8)]}, bytes(16)),
        "duplicate",
    ),
]


@pytest.mark.parametrize("data,reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_wire_rejects_malformed_message_with_reason(data, reason):
    with pytest.raises(WireError, match=reason):
        unpack(data)


def test_wire_rejects_message_over_max_bytes():
    data = pack({}, {"w": torch.zeros(100)})

    unpack(data, max_bytes=len(data))
    with pytest.raises(WireError, match="over the limit of 100"):
        unpack(data, max_bytes=100)


def test_wire_fuzz_raises_only_wire_error():
    rng = random.Random(0)
    good = pack({"round": 1}, {"a": torch.randn(3, 2), "b": torch.tensor(True), "c": torch.arange(4)})
    candidates = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))) for _ in range(100)]
    candidates += [b"SHFL\x01" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))) for _ in range(100)]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        candidates.append(bytes(data))
    candidates += [good[:n] for n in range(len(good))]
    # Well-formed JSON with one field of one entry swapped for a value of the wrong kind.
    header = {"meta": {}, "tensors": [_entry("a"), _entry("b", dtype="int64", offset=8)]}
    odd_values = [-1, 2**70, 1.5, "x", None, True, [], {}, [-1], [2**64, 0], "float32"]
    for _ in range(200):
        h = json.loads(json.dumps(header))
        target = h["tensors"][rng.randrange(2)] if rng.random() < 0.9 else h
        target[rng.choice(sorted(target))] = rng.choice(odd_values)
        candidates.append(_raw(h, bytes(16)))

    rejected = 0
    for data in candidates:
        try:
            unpack(data)
        except WireError:
            rejected += 1

    # Flips inside tensor bytes still parse; the rest must all be rejected cleanly.
    assert rejected > len(candidates) // 2


def test_certs_written_with_private_keys_0600_and_server_san(tmp_path):
    files = make_certs(tmp_path, clients=["alice", "bob"])

    assert set(files) == {"ca.pem", "ca.key"} | {f"{s}/{f}" for s in ("server", "alice", "bob")
                                                 for f in (f"{s}.pem", f"{s}.key", "ca.pem")}
    for name, path in files.items():
        assert path.is_file() and path == tmp_path / name
        assert (path.stat().st_mode & 0o777 == 0o600) == name.endswith(".key"), name
    # What a party is handed holds its own key and the CA's certificate, nothing else.
    for party in ("server", "alice", "bob"):
        assert sorted(p.name for p in (tmp_path / party).iterdir()) == sorted(["ca.pem", f"{party}.key",
                                                                                f"{party}.pem"])
    server = x509.load_pem_x509_certificate(files["server/server.pem"].read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(files["ca.pem"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert files["alice/ca.pem"].read_bytes() == files["ca.pem"].read_bytes()
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_certs_refuse_to_replace_ca_unless_forced(tmp_path):
    make_certs(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()

    with pytest.raises(ValueError, match="force"):
        make_certs(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    make_certs(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != before


def test_tls_files_name_the_missing_file_and_the_command(tmp_path, caplog):
    make_certs(tmp_path, clients=2)

    # A client's own folder needs no name; the parent folder and a name find the same files.
    assert TlsFiles.client(tmp_path / "client2").cert == tmp_path / "client2" / "client2.pem"
    assert TlsFiles.client(tmp_path, "client2") == TlsFiles.client(tmp_path / "client2")
    assert TlsFiles.server(tmp_path) == TlsFiles.server(tmp_path / "server")
    with pytest.raises(ValueError, match=r"carol\.pem.*shoal fl certs --out DIR --client carol"):
        TlsFiles.client(tmp_path, "carol")
    with pytest.raises(ValueError, match=r"one client's NAME\.pem/NAME\.key \(found: none\)"):
        TlsFiles.client(tmp_path)
    assert "ca.key" not in caplog.text
    # A flat folder that holds the CA's key still works, with a warning.
    for f in ("client1.pem", "client1.key"):
        (tmp_path / f).write_bytes((tmp_path / "client1" / f).read_bytes())
    with caplog.at_level(logging.WARNING, "shoal.fl"):
        assert TlsFiles.client(tmp_path, "client1").cert == tmp_path / "client1.pem"
    assert "holds the federation CA's key" in caplog.text


def test_store_tokens_keep_only_hashes_and_their_partitions(tmp_path):
    db = tmp_path / "server.db"
    store = ServerStore(str(db))

    token = store.add_token("alice", [3, 1, 3])

    assert store.check_token(token) == Grant("alice", frozenset({1, 3}))
    assert store.check_token(token + "x") is None
    assert [(n, held) for n, _, held in store.list_tokens()] == [("alice", [1, 3])]
    with pytest.raises(ValueError, match="replace=True"):
        store.add_token("alice", [0])
    with pytest.raises(ValueError, match="at least one partition"):
        store.add_token("bob", [])
    with pytest.raises(ValueError, match="non-negative integer"):
        store.add_token("bob", [-1])
    store.close()
    assert token.encode() not in db.read_bytes()
    store = ServerStore(str(db))
    assert store.revoke_token("alice") and not store.revoke_token("alice")
    assert store.check_token(token) is None and store.list_tokens() == []


def test_store_a_token_from_before_partitions_holds_none(tmp_path):
    # A database written before tokens held partitions has a tokens table and no grants.
    db = tmp_path / "server.db"
    store = ServerStore(str(db))
    token = store.add_token("alice", [0])
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE grants"))
    store.close()

    store = ServerStore(str(db))  # creates the missing table

    assert store.check_token(token) == Grant("alice", frozenset())


def test_store_replaced_token_invalidates_the_old_one(sql_url):
    store = ServerStore(sql_url)
    old = store.add_token("alice", [0])

    new = store.add_token("alice", [1, 2], replace=True)

    assert store.check_token(old) is None and store.check_token(new) == Grant("alice", frozenset({1, 2}))


def test_store_counts_client_results(sql_url):
    store = ServerStore(sql_url)

    store.client_seen("alice")
    store.client_result("alice", True)
    store.client_result("alice", False)
    store.client_result("bob", True)

    rows = {c["name"]: c for c in store.clients()}
    assert (rows["alice"]["updates_accepted"], rows["alice"]["updates_rejected"]) == (1, 1)
    assert rows["bob"]["updates_accepted"] == 1
    assert rows["alice"]["first_seen"] <= rows["alice"]["last_seen"]


def test_store_round_and_state_survive_a_new_instance(sql_url):
    store = ServerStore(sql_url)
    assert store.last_round() == 0 and store.load_state() == {}

    store.save_round(1, {"loss": 2.0}, {"model": b"one", "opt": b"x"})
    store.save_round(2, {"loss": 1.0}, {"model": b"two"})
    with pytest.raises(ValueError, match="already saved"):
        store.save_round(2, {}, {"model": b"again"})
    store.close()

    again = ServerStore(sql_url)
    assert again.last_round() == 2
    assert again.load_state() == {"model": b"two"}
    assert [(r["round"], r["metrics"]) for r in again.round_metrics()] == [(1, {"loss": 2.0}), (2, {"loss": 1.0})]


def test_store_failed_save_leaves_previous_round_whole(sql_url):
    store = ServerStore(sql_url)
    store.save_round(1, {}, {"model": b"one"})

    with pytest.raises(TypeError):
        store.save_round(2, {}, {"model": b"two", "bad": None})

    assert store.last_round() == 1 and store.load_state() == {"model": b"one"}


def test_store_detects_tampered_state(tmp_path):
    db = tmp_path / "s.db"
    store = ServerStore(str(db))
    store.save_round(1, {}, {"model": b"weights"})
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE state SET value = ? WHERE key = 'model'", (b"evil",))

    with pytest.raises(ValueError, match="'model'.*sha256"):
        ServerStore(str(db)).load_state()


SRC = Path(__file__).resolve().parents[1] / "src"

_KILLED_WRITER = """
import sys
from shoal.fl.store import Grant, ServerStore
store = ServerStore(sys.argv[1])
r = 0
while True:
    r += 1
    store.save_round(r, {"round": r}, {"model": bytes([r % 256]) * 200_000, "round": str(r).encode()})
    print("saved", r, flush=True)
"""


def test_store_is_consistent_after_sigkill_mid_write(tmp_path):
    db = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(db)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"saved 1\n"
    time.sleep(0.3)  # killed somewhere inside a later save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    store = ServerStore(str(db))
    last = store.last_round()
    blobs = store.load_state()

    assert last >= 1
    assert blobs["round"] == str(last).encode() and blobs["model"] == bytes([last % 256]) * 200_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_certs(d, clients=["alice"])
    other = d / "other"
    make_certs(other, clients=["alice"])
    return d


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return (peer_identity(context) or "").encode()


def _deny(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not on the list")


def _crash(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise KeyError("secret internals")


HANDLERS = {"Echo": _echo, "WhoAmI": _whoami, "Deny": _deny, "Crash": _crash}


@pytest.fixture(scope="module")
def server(pki):
    srv, port = serve("127.0.0.1:0", HANDLERS, TlsFiles.server(pki), max_message_bytes=1 << 20)
    yield f"127.0.0.1:{port}"
    srv.stop(None)


def test_transport_echo_and_identity_over_mutual_tls(pki, server):
    with Connection(server, TlsFiles.client(pki, "alice"), retry_for_s=1) as conn:
        assert conn.call("Echo", b"\x00hello\xff") == b"\x00hello\xff"
        assert conn.call("WhoAmI", b"") == b"alice"


def test_transport_abort_reaches_the_client_as_rpc_failed(pki, server):
    with Connection(server, TlsFiles.client(pki, "alice"), retry_for_s=1) as conn:
        with pytest.raises(RpcFailed) as denied:
            conn.call("Deny", b"")
        with pytest.raises(RpcFailed) as crashed:
            conn.call("Crash", b"")
        with pytest.raises(RpcFailed) as unknown:
            conn.call("NoSuchMethod", b"")

    assert (denied.value.code, denied.value.details) == ("PERMISSION_DENIED", "not on the list")
    assert crashed.value.code == "INTERNAL" and "secret" not in crashed.value.details
    assert unknown.value.code == "UNIMPLEMENTED"


def test_transport_refuses_message_over_the_limit(pki, server):
    with Connection(server, TlsFiles.client(pki, "alice"), max_message_bytes=4 << 20, retry_for_s=1) as conn:
        assert len(conn.call("Echo", bytes(1000))) == 1000
        with pytest.raises(RpcFailed) as big:
            conn.call("Echo", bytes(2 << 20))

    assert big.value.code == "RESOURCE_EXHAUSTED"


def test_transport_refuses_a_client_without_certificate(pki, server):
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())

    with grpc.secure_channel(server, credentials) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/shoal.fl.Federation/Echo")(b"hi", timeout=5)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.processes
def test_transport_refuses_a_client_certificate_from_another_ca(pki, server):
    # The client trusts the right server but presents another federation's certificate.
    files = TlsFiles(ca=pki / "ca.pem", cert=pki / "other" / "alice" / "alice.pem",
                     key=pki / "other" / "alice" / "alice.key")
    start = time.monotonic()

    with Connection(server, files, retry_for_s=1) as conn:
        with pytest.raises(RpcFailed) as refused:
            conn.call("Echo", b"hi", timeout=5)

    assert refused.value.code == "UNAVAILABLE"
    # It gives up after its 1 s of retries, not the default two minutes: the bound
    # is that window, one call's 5 s timeout and room for a loaded machine.
    assert time.monotonic() - start < 1 + 5 + 5


@pytest.mark.processes
def test_transport_connection_waits_for_a_server_that_starts_late(pki):
    with socket.socket() as probe:  # a free port, free again once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started, listening = [], []

    def start_late():
        time.sleep(1.0)
        started.append(serve(f"127.0.0.1:{port}", HANDLERS, TlsFiles.server(pki))[0])
        listening.append(time.monotonic())

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        with Connection(f"127.0.0.1:{port}", TlsFiles.client(pki, "alice"), retry_for_s=15) as conn:
            t0 = time.monotonic()
            assert conn.call("Echo", b"late", timeout=5) == b"late"
            answered = time.monotonic()
    finally:
        thread.join()
        for srv in started:
            srv.stop(None)

    # The first call came before the server listened and was retried until it did,
    # within the connection's retry window.
    assert t0 < listening[0] <= answered < t0 + 15
