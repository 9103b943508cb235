"""``shoal fl simulate --processes N``: a round's clients spread over worker processes give
bit-for-bit what one process gives; failures stop the run; 10,000 clients fit."""

import json

import pytest
import torch

from shoal.config import ConfigError
from shoal.fl import pool
from shoal.fl.config import load_fl_config
from shoal.fl.federation import Federation
from shoal.fl.simulate import ClientFailed, WorkerDied, simulate

TINY = {
    "seed": 1,
    "data": {"dataset": "digits", "batch_size": 16},
    "model": "mlp:hidden=[16]",
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "fl": {"clients": 8, "clients_per_round": 4, "rounds": 3, "eval_every": 1,
           "fleet": {"local_epochs_max": 3}},  # unequal clients, so the longest-first order differs from theirs
}


def _run(tmp_path, monkeypatch, processes, *overrides, base=TINY):
    """The run's final weights, its metrics lines without their wall-clock times, and its summary."""
    final = {}
    close = Federation.close

    def keep_weights(fed, **extra):
        final["weights"] = fed.weights.clone()
        return close(fed, **extra)

    monkeypatch.setattr(Federation, "close", keep_weights)
    out = tmp_path / f"p{processes}"
    final["summary"] = simulate(load_fl_config(base, [f"fl.processes={processes}", *overrides], out=str(out)),
                                progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return final["weights"], [{k: v for k, v in r.items() if k != "time_s"} for r in lines], final["summary"]


@pytest.mark.processes
@pytest.mark.parametrize("overrides", [
    (),
    ("fl.codec=topk:ratio=0.05,memory=ef",),
    ("fl.codec=qsgd:levels=3", "fl.fleet.dropout=0.3"),  # a codec with a random stream, and dropouts
])
def test_two_processes_give_the_weights_and_records_of_one(tmp_path, monkeypatch, overrides):
    one_weights, one_lines, _ = _run(tmp_path, monkeypatch, 1, *overrides)
    two_weights, two_lines, _ = _run(tmp_path, monkeypatch, 2, *overrides)

    assert torch.equal(one_weights, two_weights)
    assert one_lines == two_lines
    assert [r["round"] for r in one_lines] == [1, 2, 3] and all("test_accuracy" in r for r in one_lines)
    if "fl.fleet.dropout=0.3" in overrides:
        assert sum(r["dropped"] for r in one_lines) > 0


@pytest.mark.processes
def test_a_secure_round_takes_the_workers_updates_as_it_takes_its_own(tmp_path, monkeypatch):
    # SecAgg+ rounds with the operating system's entropy, so two runs agree up to its rounding only;
    # the first round's client losses (from the same initial weights) and the round's bookkeeping exactly.
    overrides = ("fl.secure=secagg", "fl.fleet.dropout=0.3", "fl.fleet.drop_stage=masked")
    one_weights, one_lines, _ = _run(tmp_path, monkeypatch, 1, *overrides)
    two_weights, two_lines, _ = _run(tmp_path, monkeypatch, 2, *overrides)

    keys = ("selected", "dropped_clients", "secure_clients", "participating", "uplink_bytes", "downlink_bytes")
    assert [[r[k] for k in keys] for r in one_lines] == [[r[k] for k in keys] for r in two_lines]
    assert one_lines[0]["loss"] == two_lines[0]["loss"] and sum(r["dropped"] for r in one_lines) > 0
    assert torch.allclose(one_weights, two_weights, atol=1e-3)


@pytest.mark.processes
def test_a_client_that_raises_in_a_worker_stops_the_run_as_in_one_process(tmp_path):
    base = {**TINY, "model": "tests.fl_entry:exploding"}
    messages = []
    for processes in (1, 2):
        cfg = load_fl_config(base, [f"fl.processes={processes}"], out=str(tmp_path / str(processes)))
        with pytest.raises(ClientFailed, match="client .* failed in round 1: RuntimeError: local training exploded"
                           ) as failed:
            simulate(cfg, progress=False)
        messages.append(str(failed.value))
    assert messages[0] == messages[1]  # the first failing client in client order, wherever it ran


@pytest.mark.processes
def test_a_worker_that_is_killed_stops_the_run_with_a_clear_error(tmp_path):
    cfg = load_fl_config({**TINY, "model": "tests.fl_entry:killed_in_worker"}, ["fl.processes=2"],
                         out=str(tmp_path))
    with pytest.raises(WorkerDied, match=r"worker process \d \(pid \d+\) died \(killed by SIGKILL\) while "
                                         r"training client \d+ in round 1"):
        simulate(cfg, progress=False)


CROSS_DEVICE = {
    "seed": 0,
    "data": {"dataset": "synthetic:samples=20000,test_samples=500,shape=[8]", "batch_size": 2},
    "model": "mlp:hidden=[8]",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "fl": {"clients": 10_000, "clients_per_round": 100, "rounds": 1},
}


@pytest.mark.processes
def test_ten_thousand_clients_a_hundred_a_round_fetch_only_the_sampled(tmp_path, monkeypatch):
    fetched = []
    fetch = pool.fetch
    monkeypatch.setattr(pool, "fetch", lambda data, indices: fetched.append(indices) or fetch(data, indices))
    one_weights, one_lines, _ = _run(tmp_path, monkeypatch, 1, base=CROSS_DEVICE)
    two_weights, two_lines, two = _run(tmp_path, monkeypatch, 2, base=CROSS_DEVICE)

    assert len(fetched) == 100 and all(len(indices) == 2 for indices in fetched)  # in one process: counted here
    assert one_lines[0]["selected"] == one_lines[0]["participating"] == 100
    assert torch.equal(one_weights, two_weights) and one_lines == two_lines
    assert two["processes"] == 2 and two["worker_peak_memory_bytes"] > 0  # the workers' memory is reported too


def test_processes_is_checked():
    assert load_fl_config(TINY).fl.processes is None  # the usable cores
    with pytest.raises(ConfigError, match="fl.processes"):
        load_fl_config(TINY, ["fl.processes=0"])
