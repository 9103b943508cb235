"""The federation server in this process over real gRPC (loopback, no TLS): what it answers a client."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch

from shoal.fl import wire
from shoal.fl.config import load_fl_config
from shoal.fl.server import FlServer
from shoal.fl.store import ServerStore
from shoal.fl.transport import Connection


@contextlib.contextmanager
def _running(tmp_path, **server_options):
    """Round 1 of a one-round federation, open for partitions 0 and 1 (one token
    holds both); yields (connection, token, server). The round stays open while
    either partition has not answered; on leaving, it ends as if both had."""
    cfg = load_fl_config({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[8]",
        "fl": {"clients": 2, "clients_per_round": 2, "min_clients": 2, "rounds": 1, "deadline_s": 60},
        "server": {"address": "127.0.0.1:0", "db": str(tmp_path / "server.db"), "insecure": True,
                   "wait_for_clients_s": 60, **server_options},
        "out": str(tmp_path / "run"),
    })
    with ServerStore(cfg.server.db) as store:
        token = store.add_token("site")
    server = FlServer(cfg, cfg.out)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.port and time.monotonic() < end:
        time.sleep(0.05)
    with Connection(f"127.0.0.1:{server.port}", None, retry_for_s=30) as conn:
        for part in (0, 1):
            conn.call("Join", wire.pack({"token": token, "partition": part}, {}))
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
    if action == "reject":
        assert line["norm_rejected_clients"] == [0] and 0 in line["rejected_clients"] and not line["aggregated"]
        assert torch.equal(server.fed.weights, before)
    else:
        assert line["norm_clipped_clients"] == [0] and line["aggregated"]
        assert float((server.fed.weights - before).norm()) <= 5.0  # the mean of a clipped and a zero update
