"""The federation server in this process over real gRPC (loopback, no TLS): what it answers a client."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import grpc
import pytest
import torch

from shoal.fl import wire
from shoal.fl.certs import TlsFiles, make_certs
from shoal.fl.config import load_fl_config
from shoal.fl.server import POLL_S, SMALL_REQUEST_BYTES, FlServer
from shoal.fl.store import ServerStore
from shoal.fl.transport import Connection, RpcFailed


@contextlib.contextmanager
def _running(tmp_path, *, tls: bool = False, **server_options):
    """Round 1 of a one-round federation, open for partitions 0 and 1 (the token
    of client "site" holds both); yields (connection, token, server). The round
    stays open while either partition has not answered; on leaving, it ends as
    if both had. With ``tls``, mutual TLS with the certificates in tmp_path/certs
    (clients "site" and "other"), the connection presenting site's."""
    certs = tmp_path / "certs"
    if tls:
        make_certs(certs, clients=["site", "other"])
    cfg = load_fl_config({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[8]",
        "fl": {"clients": 2, "clients_per_round": 2, "min_clients": 2, "rounds": 1, "deadline_s": 60},
        "server": {"address": "127.0.0.1:0", "db": str(tmp_path / "server.db"), "insecure": not tls,
                   "certs": str(certs), "wait_for_clients_s": 60, **server_options},
        "out": str(tmp_path / "run"),
    })
    with ServerStore(cfg.server.db) as store:
        token = store.add_token("site", [0, 1])
    server = FlServer(cfg, cfg.out)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.port and time.monotonic() < end:
        time.sleep(0.05)
    with Connection(f"127.0.0.1:{server.port}", TlsFiles.client(certs / "site") if tls else None,
                    retry_for_s=30) as conn:
        for part in (0, 1):
            conn.call("Join", wire.pack({"token": token, "partition": part}, {}))
        while server.current is None and time.monotonic() < end + 60:  # both joined: round 1 opens
            time.sleep(0.05)
        yield conn, token, server
        with server.cond:
            if server.current is not None and not server.current.closed:
                server.current.answered = set(server.current.selected)
            server.cond.notify_all()
        for part in (0, 1):  # hear "done", so the server need not wait for these clients
            while "done" not in wire.unpack(conn.call("Task", wire.pack({"token": token, "partition": part,
                                                                        "after": 1}, {})))[0]:
                pass
    thread.join(timeout=60)
    assert not thread.is_alive()


@pytest.fixture
def live(tmp_path):
    with _running(tmp_path) as running:
        yield running


def _task(conn: Connection, me: dict) -> tuple[dict, dict]:
    while True:
        meta, tensors = wire.unpack(conn.call("Task", wire.pack({**me, "after": 0}, {})))
        if "weights" in tensors:
            return meta, tensors


def _submit(conn: Connection, me: dict, rnd: int, loss, tensors: dict) -> dict:
    reply, _ = wire.unpack(conn.call("Submit", wire.pack(
        {**me, "round": rnd, "num_examples": 10, "loss": loss}, tensors)))
    return reply


def test_a_retry_after_a_rejection_gets_the_rejection_again(live):
    conn, token, _ = live
    me = {"token": token, "partition": 0}
    meta, _ = _task(conn, me)
    first = _submit(conn, me, meta["round"], 0.5, {"p0": torch.zeros(7)})
    again = _submit(conn, me, meta["round"], 0.5, {"p0": torch.zeros(7)})
    assert not first["accepted"] and "tensor 0" in first["reason"]
    assert again == first  # not "accepted: already received"


def test_an_update_whose_loss_is_not_a_finite_number_is_rejected(live):
    conn, token, server = live
    me = {"token": token, "partition": 1}
    meta, tensors = _task(conn, me)
    update = {"p0": torch.zeros_like(tensors["weights"])}  # what the uplink codec (none) sends
    reply = _submit(conn, me, meta["round"], float("nan"), update)
    assert not reply["accepted"] and "loss must be a finite number, got nan" in reply["reason"]
    assert server.current.tally.results == []


def test_a_client_without_tls_is_warned(caplog):
    with caplog.at_level("WARNING", logger="shoal.fl"):
        Connection("127.0.0.1:1", None, retry_for_s=0).close()
    assert "connecting to 127.0.0.1:1 WITHOUT TLS: the server is not authenticated" in caplog.text


def test_an_update_is_weighted_by_the_partitions_true_size_not_the_clients_claim(live):
    conn, token, server = live
    me = {"token": token, "partition": 0}
    meta, tensors = _task(conn, me)
    claim = len(server.fed.data.train)  # the whole training set, to outweigh everyone
    reply, _ = wire.unpack(conn.call("Submit", wire.pack(
        {**me, "round": meta["round"], "num_examples": claim, "loss": 0.1},
        {"p0": torch.zeros_like(tensors["weights"])})))
    held = len(server.fed.parts[0])
    assert not reply["accepted"] and f"partition 0 holds {held} training samples" in reply["reason"]


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_update_over_the_norm_bound_is_rejected_or_clipped(tmp_path, action):
    # A finite delta of 1e30 passes every format check; unbounded, it sent the global weights to 1e27.
    with _running(tmp_path, max_update_norm=5.0, update_norm_action=action) as (conn, token, server):
        before = server.fed.weights.clone()
        for part, value in ((0, 1e30), (1, 0.0)):
            me = {"token": token, "partition": part}
            meta, tensors = _task(conn, me)
            held = len(server.fed.parts[part])
            reply, _ = wire.unpack(conn.call("Submit", wire.pack(
                {**me, "round": meta["round"], "num_examples": held, "loss": 0.1},
                {"p0": torch.full_like(tensors["weights"], value)})))
            assert reply["accepted"], reply
        end = time.monotonic() + 60
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < end:
            time.sleep(0.05)
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with ServerStore(str(tmp_path / "server.db")) as store:
        (site,) = store.clients()
    if action == "reject":
        assert line["norm_rejected_clients"] == [0] and 0 in line["rejected_clients"] and not line["aggregated"]
        assert torch.equal(server.fed.weights, before)
        # Answered "accepted" at submit (the bound is the round's), counted as rejected once it was.
        assert (site["updates_accepted"], site["updates_rejected"]) == (1, 1)
    else:
        assert line["norm_clipped_clients"] == [0] and line["aggregated"]
        assert float((server.fed.weights - before).norm()) <= 5.0  # the mean of a clipped and a zero update


def test_a_token_speaks_only_for_the_partitions_it_holds(live, caplog):
    conn, token, server = live
    with ServerStore(server.cfg.server.db) as store:
        rogue = store.add_token("rogue", [1])
    heard = server.seen[0]

    for method, extra in (("Join", {}), ("Task", {"after": 0}), ("Submit", {"round": 1, "num_examples": 1})):
        with caplog.at_level("WARNING", logger="shoal.fl"), pytest.raises(RpcFailed) as refused:
            conn.call(method, wire.pack({"token": rogue, "partition": 0, **extra}, {}))
        assert (refused.value.code, refused.value.details) == (
            "PERMISSION_DENIED", "this token does not hold partition 0 (it holds 1)")
    assert "(token rogue, certificate None): partition 0 is not the token's (it holds 1)" in caplog.text
    assert "ipv4:127.0.0.1" in caplog.text  # the peer
    assert server.seen[0] == heard  # a refused claim does not make partition 0 look alive
    assert server.current.answered == set()


def test_the_first_token_to_answer_a_partition_owns_it(live):
    conn, token, server = live
    with ServerStore(server.cfg.server.db) as store:
        second = store.add_token("second", [1])  # two tokens hold partition 1
    me = {"token": token, "partition": 1}
    meta, tensors = _task(conn, me)
    update = {"p0": torch.zeros_like(tensors["weights"])}
    held = len(server.fed.parts[1])

    def submit(who):
        return wire.unpack(conn.call("Submit", wire.pack(
            {"token": who, "partition": 1, "round": meta["round"], "num_examples": held, "loss": 0.1}, update)))[0]

    assert submit(token) == {"accepted": True, "reason": ""}
    assert submit(second) == {"accepted": False, "reason": "round 1's update for partition 1 came from another token"}
    assert submit(token) == {"accepted": True, "reason": "already received"}  # a retry
    assert len(server.current.tally.results) == 1


def test_a_certificate_works_only_with_its_own_clients_token(tmp_path):
    with _running(tmp_path, tls=True) as (conn, token, server):
        other = Connection(f"127.0.0.1:{server.port}", TlsFiles.client(tmp_path / "certs" / "other"),
                           retry_for_s=30)
        with other, pytest.raises(RpcFailed) as refused:
            other.call("Join", wire.pack({"token": token, "partition": 0}, {}))
        assert refused.value.code == "PERMISSION_DENIED"
        assert refused.value.details == "the client certificate is for 'other', the token for another client"
        meta, _ = wire.unpack(conn.call("Join", wire.pack({"token": token, "partition": 0}, {})))
        assert meta["round"] == 0  # site's own certificate and token


def test_one_waiting_task_per_token_and_partition_and_join_still_answers(live):
    conn, token, server = live
    # Nothing newer than round 1 exists, so each of these would wait POLL_S for work.
    poll = wire.pack({"token": token, "partition": 0, "after": 1, "incarnation": server.incarnation}, {})
    start = threading.Barrier(49)
    answers: list = []
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # no retries: every answer counts
        stub = channel.unary_unary("/shoal.fl.Federation/Task")

        def call():
            start.wait()
            try:
                stub(poll, timeout=30)
                answers.append("waited")
            except grpc.RpcError as err:
                answers.append(err.code())

        threads = [threading.Thread(target=call) for _ in range(48)]
        for t in threads:
            t.start()
        start.wait()
        asked = time.monotonic()
        conn.call("Join", wire.pack({"token": token, "partition": 1}, {}))
        joined = time.monotonic() - asked
        for t in threads:
            t.join()

    # One poll waits; the others are refused at once (ABORTED, or the server's call limit), and an
    # honest Join is answered meanwhile, well inside the window that keeps a client in the sample.
    assert answers.count("waited") <= 3, answers  # one per POLL_S, were the 48 slow to leave
    assert set(answers) - {"waited"} <= {grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert grpc.StatusCode.ABORTED in answers
    assert joined < POLL_S, joined


def test_join_and_task_over_the_small_limit_are_refused_before_the_token_is_read(live):
    conn, _, _ = live
    big = wire.pack({"token": "not-a-token", "partition": 0}, {"pad": torch.zeros(SMALL_REQUEST_BYTES // 4)})
    for method in ("Join", "Task"):
        with pytest.raises(RpcFailed) as refused:
            conn.call(method, big)
        assert refused.value.code == "INVALID_ARGUMENT", method
        assert f"over the limit of {SMALL_REQUEST_BYTES}" in refused.value.details
    # A submit's tensors are not read before its token passed: trailing garbage is never looked at.
    with pytest.raises(RpcFailed) as refused:
        conn.call("Submit", wire.pack({"token": "not-a-token", "partition": 0}, {"p0": torch.zeros(4)}) + b"??")
    assert refused.value.code == "UNAUTHENTICATED"


def test_a_client_of_an_earlier_server_process_is_offered_the_reopened_round(live):
    conn, token, server = live
    me = {"token": token, "partition": 0, "after": 1}
    # From this process: nothing after round 1.
    meta, _ = wire.unpack(conn.call("Task", wire.pack({**me, "incarnation": server.incarnation}, {})))
    assert meta == {"wait": True, "incarnation": server.incarnation}
    # A client that fetched round 1 from a server that died since: this process opened round 1 again.
    meta, tensors = wire.unpack(conn.call("Task", wire.pack({**me, "incarnation": "0123456789abcdef"}, {})))
    assert meta["round"] == 1 and meta["incarnation"] == server.incarnation and "weights" in tensors
