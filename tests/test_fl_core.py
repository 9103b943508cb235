"""Federated learning without the network: partitions, server strategies,
local training, and the one-process simulation end to end."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from shoal.comm.codecs.base import build_codec
from shoal.comm.memory import ErrorFeedback
from shoal.config import ConfigError, OptimizerConfig
from shoal.data.partition import partition
from shoal.fl.config import load_fl_config
from shoal.fl.federation import Federation, UpdateRejected
from shoal.fl.local import FlatWeights, LocalTrainer
from shoal.fl.simulate import ClientFailed, simulate
from shoal.fl.strategies.base import ClientResult, build_fed_strategy
from shoal.registry import CODECS, FED_STRATEGIES, PARTITIONS, load_builtins
from tests.conftest import invoke_cli, run_cli

load_builtins()
LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _parts(spec, clients=20, seed=0):
    return partition(PARTITIONS.resolve(spec), LABELS, clients, seed)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:alpha=0.1", "dirichlet:alpha=100", "shards:classes=2",
                                  "quantity:alpha=0.5"])
def test_every_partition_deals_each_sample_once(spec):
    parts = _parts(spec)
    joined = np.concatenate(parts)
    assert len(parts) == 20 and sorted(joined.tolist()) == list(range(len(LABELS)))
    assert min(len(p) for p in parts) >= 2
    again = _parts(spec)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # the seed decides
    assert not all(np.array_equal(a, b) for a, b in zip(parts, _parts(spec, seed=1)))


def test_label_skew_follows_alpha_and_shards_hold_few_classes():
    def classes(parts):
        return np.mean([len(np.unique(LABELS[p])) for p in parts])
    assert classes(_parts("dirichlet:alpha=0.1")) < 5 < 9 < classes(_parts("dirichlet:alpha=100"))
    assert max(len(np.unique(LABELS[p])) for p in _parts("shards:classes=2")) <= 3
    sizes = [len(p) for p in _parts("quantity:alpha=0.5")]
    assert max(sizes) > 3 * min(sizes)  # sizes skewed, labels not
    assert [len(p) for p in _parts("iid")] == [50] * 20


def _results(*deltas, counts=None):
    counts = counts or [1] * len(deltas)
    return [ClientResult(str(k), torch.tensor(d, dtype=torch.float32), n, 0.0)
            for k, (d, n) in enumerate(zip(deltas, counts))]


def _strategy(spec):
    return build_fed_strategy(FED_STRATEGIES.resolve(spec))


def test_fedavg_weights_by_sample_count_and_robust_rules_ignore_an_outlier():
    w = torch.zeros(2)
    assert torch.allclose(_strategy("fedavg").aggregate(1, w, _results([1.0, 0.0], [4.0, 4.0], counts=[3, 1])),
                          torch.tensor([1.75, 1.0]))
    honest = [[1.0, 1.0], [1.2, 0.8], [0.8, 1.2], [1.1, 0.9]]
    attacked = _results(*honest, [1e6, -1e6])
    median = _strategy("fedmedian").aggregate(1, w, attacked)
    trimmed = _strategy("trimmed_mean:beta=0.2").aggregate(1, w, attacked)
    assert torch.allclose(median, torch.tensor([1.1, 0.9]))  # the 3rd of 5 values per coordinate
    assert (trimmed - 1).abs().max() < 0.15 and (_strategy("fedavg").aggregate(1, w, attacked).abs() > 1e5).all()
    even = _strategy("fedmedian").aggregate(1, w, _results([1.0], [2.0], [3.0], [10.0]))
    assert torch.allclose(even, torch.tensor([2.5]))


def test_server_optimisers_follow_their_update_rules():
    w, d = torch.zeros(1), [0.5]
    adam = _strategy("fedadam:eta=0.1,beta1=0.9,beta2=0.99,tau=0.001")
    m, v = 0.1 * 0.5, 0.01 * 0.25
    assert torch.allclose(adam.aggregate(1, w, _results(d)), torch.tensor([0.1 * m / (v ** 0.5 + 0.001)]))
    yogi = _strategy("fedyogi:eta=0.1,beta1=0.9,beta2=0.99,tau=0.001")
    v_yogi = 0.01 * 0.25  # from v = 0: v - (1-b2) * d^2 * sign(v - d^2)
    assert torch.allclose(yogi.aggregate(1, w, _results(d)), torch.tensor([0.1 * m / (v_yogi ** 0.5 + 0.001)]))
    adagrad = _strategy("fedadagrad:eta=0.1,beta1=0.0,tau=0.001")
    assert torch.allclose(adagrad.aggregate(1, w, _results(d)), torch.tensor([0.1 * 0.5 / (0.5 + 0.001)]))
    avgm = _strategy("fedavgm:server_lr=1.0,momentum=0.5")
    avgm.aggregate(1, w, _results(d))
    assert torch.allclose(avgm.aggregate(2, w, _results(d)), torch.tensor([0.5 * 0.5 + 0.5]))
    # Server state survives a restart: a fresh strategy loaded from the state takes the same step.
    restored = _strategy("fedadam:eta=0.1,beta1=0.9,beta2=0.99,tau=0.001")
    restored.load_state_dict({k: v.clone() for k, v in adam.state_dict().items()})
    assert torch.equal(restored.aggregate(2, w, _results(d)), adam.aggregate(2, w, _results(d)))


def test_sampling_is_reproducible_from_the_seed():
    s = _strategy("fedavg")
    pick = [s.sample(3, [str(c) for c in range(100)], 10, np.random.default_rng([0, 3])) for _ in range(2)]
    assert pick[0] == pick[1] and len(set(pick[0])) == 10
    assert s.sample(4, [str(c) for c in range(100)], 10, np.random.default_rng([0, 4])) != pick[0]


def _trainer(codec="none"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return LocalTrainer(model, OptimizerConfig(lr=0.1, momentum=0.0), 8, build_codec(CODECS.resolve(codec)))


def test_fedprox_term_pulls_local_weights_towards_the_global_ones():
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    t = _trainer()
    w = t.flat.get()
    free = t.fit(w, x, y, epochs=5, config={}, seed=1)
    held = t.fit(w, x, y, epochs=5, config={"mu": 10.0}, seed=1)
    assert held.delta.norm() < 0.5 * free.delta.norm()
    assert torch.equal(t.fit(w, x, y, epochs=5, config={}, seed=1).delta, free.delta)  # same seed, same run


def test_fedsgd_client_takes_one_plain_full_batch_step():
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    t = _trainer()
    w = t.flat.get()
    result = t.fit(w, x, y, epochs=3, config={"full_batch_step": True}, seed=0)
    t.flat.set(w)
    loss = nn.functional.cross_entropy(t.model(x), y)
    grads = torch.autograd.grad(loss, list(t.model.parameters()))
    assert torch.allclose(result.delta, -0.1 * torch.cat([g.reshape(-1) for g in grads]), atol=1e-6)


def test_uplink_codec_with_error_feedback_carries_what_it_did_not_send():
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    t = _trainer("topk:ratio=0.1,memory=ef")
    w, memory = t.flat.get(), ErrorFeedback()
    result = t.fit(w, x, y, epochs=1, config={}, seed=0, memory=memory)
    dense = _trainer().fit(w, x, y, epochs=1, config={}, seed=0).delta
    assert (result.delta != 0).sum() <= 0.1 * len(dense) + 1
    assert torch.allclose(result.delta + memory.residuals[0], dense, atol=1e-6)
    assert result.payload.wire_bytes < dense.numel() * 4 / 4


def test_flat_weights_include_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    flat = FlatWeights(model)
    assert flat.numel == 12 + 6 + 6  # linear, bn affine, bn running mean/var (the step counter is not float)
    flat.set(torch.arange(flat.numel, dtype=torch.float32))
    assert torch.equal(flat.get(), torch.arange(flat.numel, dtype=torch.float32))


def _cfg(tmp_path, **fl):
    return load_fl_config({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[32]",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "fl": {"clients": 10, "clients_per_round": 4, "rounds": 6, "eval_every": 2, **fl}, "out": str(tmp_path),
    })


def test_server_rejects_updates_that_do_not_fit_the_model(tmp_path):
    fed = Federation(_cfg(tmp_path, codec="int8"), tmp_path)
    good = fed.codec.encode(torch.randn(fed.flat.numel)).tensors
    held = len(fed.parts[0])
    assert fed.decode(0, good, held).shape == (fed.flat.numel,)
    bad = [
        ("tensors", [good[0]], held),
        ("int8", [good[0][:-1], good[1]], held),
        ("float32", [good[0].float(), good[1]], held),
        ("NaN", [good[0], torch.tensor([float("nan")])], held),
        ("num_examples", good, 0),
        (f"partition 0 holds {held} training samples", good, len(fed.data.train)),  # a claim of the whole set
    ]
    for words, tensors, count in bad:
        with pytest.raises(UpdateRejected, match=words):
            fed.decode(0, tensors, count)


@pytest.mark.parametrize("codec, words", [("topk:ratio=0.1", "does not decode"),
                                          ("topk:ratio=0.1,positions=bitmap", "bitmap marks")])
def test_server_rejects_payloads_of_the_right_shape_that_do_not_decode(tmp_path, codec, words):
    fed = Federation(_cfg(tmp_path, codec=codec), tmp_path)
    values, positions = fed.codec.encode(torch.randn(fed.flat.numel)).tensors
    if positions.dtype == torch.uint8:
        positions = positions.clone()
        positions[0] ^= 0xFF  # the bitmap's count no longer matches the values
    else:
        positions = torch.full_like(positions, fed.flat.numel)  # one past the end
    with pytest.raises(UpdateRejected, match=words):
        fed.decode(0, [values, positions], len(fed.parts[0]))


def test_simulation_learns_writes_outputs_and_repeats_itself(tmp_path):
    a = simulate(_cfg(tmp_path / "a", fleet={"dropout": 0.3}), progress=False)
    b = simulate(_cfg(tmp_path / "b", fleet={"dropout": 0.3}), progress=False)
    assert a["final_accuracy"] > 0.6 and a["final_accuracy"] == b["final_accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, 7))
    assert sum(r["dropped"] for r in lines) > 0
    assert all(r["participating"] + r["dropped"] == r["selected"] == 4 for r in lines)
    assert a["uplink_bytes"] == sum(r["uplink_bytes"] for r in lines) > 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ("final_accuracy", "rounds", "rounds_to_target", "uplink_bytes", "downlink_bytes"):
        assert key in summary
    assert (tmp_path / "a" / "curves.png").is_file()


def test_slow_clients_miss_the_deadline(tmp_path):
    out = simulate(_cfg(tmp_path, fleet={"slow_fraction": 0.5, "slow_factor": 1e3}, deadline_s=0.05,
                        rounds=2, eval_every=1), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["late"] for r in lines) > 0 and out["rounds"] == 2


def test_a_client_that_raises_stops_the_simulation_with_its_error(tmp_path):
    cfg = load_fl_config({"data": {"dataset": "digits"}, "model": "tests.fl_entry:exploding",
                          "fl": {"clients": 4, "clients_per_round": 2, "rounds": 3}, "out": str(tmp_path)})
    with pytest.raises(ClientFailed, match="client .* failed in round 1: RuntimeError: local training exploded"):
        simulate(cfg, progress=False)


@pytest.mark.processes
def test_simulate_cli_and_its_config_errors(tmp_path):
    cfg = tmp_path / "fl.yaml"
    cfg.write_text("data: {dataset: digits, batch_size: 16}\nmodel: mlp:hidden=[16]\n"
                   "fl: {clients: 8, clients_per_round: 4, rounds: 3, partition: dirichlet:alpha=0.5}\n")
    result = run_cli("fl", "simulate", str(cfg), "--clients", "6", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clients"] == 6
    # A bad config: exit 2, one line naming the field, no traceback (the same path for every field) ...
    result = invoke_cli("fl", "simulate", str(cfg), "--set", "fl.codec=randk", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "fl: codec: 'randk' cannot be decoded by the server alone" in result.stderr
    # ... and what the other checks say.
    for bad, words in [("fl.clients_per_round=20", "clients_per_round: 20 exceeds clients=8"),
                       ("fl.strategy=fedprox:mu=-1", "fl.strategy: ")]:
        with pytest.raises(ConfigError, match=words):
            load_fl_config(cfg, [bad])
    with pytest.raises(ConfigError, match="fl.partition"):
        load_fl_config({"fl": {"partition": "zipf"}})


def test_simulation_rejects_non_finite_updates_as_a_server_would(tmp_path):
    cfg = load_fl_config(_cfg(tmp_path, rounds=2, eval_every=1).model_dump(mode="json"),
                         ["optimizer.lr=1e38", "optimizer.momentum=0"])
    simulate(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == 4 and not r["aggregated"] for r in lines)
    assert lines[0]["test_accuracy"] == lines[1]["test_accuracy"]  # the model never moved


def test_the_norm_bound_rejects_or_clips_what_is_over_it():
    from shoal.fl.norm_bound import bound_updates
    from shoal.fl.strategies.base import ClientResult

    results = [ClientResult(str(i), torch.full((4,), v), 10, 0.1) for i, v in enumerate([1.0, 1.5, 2.0, 1e30])]
    kept, clipped, rejected = bound_updates(results, limit=None, median_multiple=3.0, action="reject")
    assert [r.client for r in kept] == ["0", "1", "2"] and clipped == [] and rejected == ["3"]
    kept, clipped, rejected = bound_updates(results, limit=3.0, median_multiple=None, action="clip")
    assert clipped == ["2", "3"] and rejected == [] and all(float(r.delta.norm()) <= 3.0 + 1e-5 for r in kept)
    assert torch.equal(kept[0].delta, results[0].delta)
    both = bound_updates(results, limit=100.0, median_multiple=3.0, action="reject")  # the smaller bound holds
    assert both[2] == ["3"]
    assert bound_updates(results, limit=None, median_multiple=None, action="reject")[0] == results


def test_a_federated_run_refuses_an_out_that_holds_the_other_modes_results(tmp_path):
    from shoal.fl.federation import claim_output

    claim_output(tmp_path, "simulation")
    claim_output(tmp_path, "simulation")  # the same mode again: a re-run overwrites its own
    with pytest.raises(ValueError, match="holds a federated simulation's results, which this server would"):
        claim_output(tmp_path, "server")
    claim_output(tmp_path / "elsewhere", "server")
