"""Sample-level DP-SGD as a federated client's local training (``fl.local_privacy``): the steps and
their ledger, the budget a client will not pass, in simulation and over real gRPC with mutual TLS."""

import json
import re
import subprocess

import pytest
import torch
from torch import nn

from shoal.config import ConfigError
from shoal.data import build_dataset
from shoal.fl.config import load_fl_config
from shoal.fl.federation import client_partitions
from shoal.fl.privacy.local_dp import LocalDpSgd, poisson_steps
from shoal.fl.simulate import simulate
from shoal.privacy.accountant import epsilon
from shoal.privacy.dp_sgd import DpSgdOptions
from tests.conftest import run_cli
from tests.test_fl_grpc import _cli, _wait

SMALL = {
    "seed": 0,
    "data": {"dataset": "digits", "batch_size": 16},
    "model": "mlp:hidden=[32]",
    "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.0},
    "fl": {"clients": 10, "clients_per_round": 5, "rounds": 6, "eval_every": 3},
}


def test_a_round_is_local_epochs_over_the_sampling_rate_in_poisson_steps_each_counted_in_the_ledger():
    local = LocalDpSgd(DpSgdOptions(noise_multiplier=1.0, clip=0.5, reproducible_noise=True), 16, seed=0)
    assert local.rate(144) == pytest.approx(16 / 144) and local.steps(144, epochs=2) == 18
    sizes = [len(b) for b in poisson_steps(1000, 0.1, 300, torch.Generator().manual_seed(1))]
    assert sum(sizes) / len(sizes) == pytest.approx(100, rel=0.05)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(144, 4), torch.randint(0, 3, (144,))
    losses = local.train(3, model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
                         epochs=1, seed=5)
    assert 0 < len(losses) <= 9 and local.ledger(3, 144).steps == 9
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert local.ledger(3, 144).spent() == pytest.approx(epsilon(1.0, 16 / 144, 9, 1e-5))


def test_a_client_sits_out_every_round_that_would_pass_its_budget_and_the_summary_says_what_each_spent(tmp_path):
    cfg = load_fl_config(SMALL, ["fl.local_privacy=dp_sgd:noise_multiplier=1.0,clip=1.0,target_epsilon=4",
                                 "fl.clients_per_round=10", "fl.rounds=4"], out=str(tmp_path))
    summary = simulate(cfg, progress=False)
    local = summary["local_privacy"]
    assert local["mechanism"] == "dp_sgd" and local["sampler"] == "poisson" and local["clients"] == 10
    # A client of n examples samples at q = 16/n, 1/q steps a round. Epsilon 4 holds two rounds, not
    # three: every client (all asked every round) trained rounds 1 and 2, then sat out 3 and 4.
    sizes = {len(p) for p in client_partitions(cfg, build_dataset(cfg.data.dataset))}
    budgets = []
    for n in sizes:
        q, steps = 16 / n, round(n / 16)
        two, three = epsilon(1.0, q, 2 * steps, 1e-5), epsilon(1.0, q, 3 * steps, 1e-5)
        assert two <= 4 < three
        budgets.append(two)
    assert local["max_epsilon"] == pytest.approx(max(budgets)) and local["clients_out_of_budget"] == 10
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["participating"] for r in rounds) == 2 * 10  # 10 clients, two rounds each
    assert rounds[-1]["participating"] == 0


def test_a_clients_ledger_saved_to_its_state_file_goes_on_after_a_restart_and_refuses_another(tmp_path):
    options = DpSgdOptions(noise_multiplier=1.0, target_epsilon=6.0)
    first = LocalDpSgd(options, 16, seed=0)
    first.ledger(2, 160).record(20)
    first.save(tmp_path / "ledger.json", 2)
    again = LocalDpSgd(options, 16, seed=0)
    again.load(tmp_path / "ledger.json", 2, 160)
    assert again.ledger(2, 160).steps == 20  # neither reset nor counted twice
    with pytest.raises(ValueError, match="holds partition 2's ledger, not partition 3's"):
        LocalDpSgd(options, 16, seed=0).load(tmp_path / "ledger.json", 3, 160)
    with pytest.raises(ValueError, match="a privacy budget cannot change settings mid-run"):
        LocalDpSgd(DpSgdOptions(noise_multiplier=2.0, target_epsilon=6.0), 16, seed=0).load(
            tmp_path / "ledger.json", 2, 160)
    LocalDpSgd(options, 16, seed=0).load(tmp_path / "none.json", 2, 160)  # no file yet: a new ledger


@pytest.mark.parametrize("setting, message", [
    ("fl.local_privacy=dp_sgd:target_epsilon=4", "local_privacy: give noise_multiplier="),
    ("fl.local_privacy=dp_sgd:noise_multiplier=0.01", "noise_multiplier"),
    ("fl.local_privacy=dp_sgd:noise_multiplier=1,clip=0", "clip"),
])
def test_a_local_privacy_it_cannot_honour_is_a_config_error_naming_the_field(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_fl_config(SMALL, [setting])
    with pytest.raises(ConfigError, match="local_privacy: fedsgd takes one full-batch step"):
        load_fl_config(SMALL, ["fl.local_privacy=dp_sgd:noise_multiplier=1", "fl.strategy=fedsgd"])


@pytest.mark.processes
def test_clients_over_grpc_train_by_local_dp_sgd_and_report_their_epsilon(tmp_path):
    certs, db = tmp_path / "certs", tmp_path / "server.db"
    cfg = tmp_path / "fl.yaml"
    cfg.write_text(f"""
data: {{dataset: digits, batch_size: 16}}
model: mlp:hidden=[32]
optimizer: {{name: sgd, lr: 0.2, momentum: 0.0}}
fl: {{clients: 2, clients_per_round: 2, min_clients: 2, rounds: 3, eval_every: 1, deadline_s: 30,
     local_privacy: "dp_sgd:noise_multiplier=1.5,clip=1.0,target_epsilon=20"}}
server: {{address: "127.0.0.1:0", db: {db}, certs: {certs}}}
out: {tmp_path / "run"}
""")
    assert run_cli("fl", "certs", "--out", str(certs), "--client=client0", "--client=client1").returncode == 0
    tokens = []
    for i in range(2):
        added = run_cli("fl", "token", "add", f"client{i}", "--partition", str(i), "--config", str(cfg))
        assert added.returncode == 0, added.stderr
        tokens.append(added.stdout.strip())
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_cli("fl", "server", cfg, log=tmp_path / "server.log"))
        out = tmp_path / "run"
        address = _wait(lambda: (out / "server.json").exists()
                        and json.loads((out / "server.json").read_text())["address"], 60, "the server to listen")
        procs += [_cli("fl", "client", cfg, "--server", address, "--token", tokens[i], "--partition", i,
                       "--name", f"client{i}", "--privacy-state", tmp_path / f"ledger{i}.json",
                       log=tmp_path / f"client{i}.log") for i in range(2)]
        for p in procs:
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "client0.log").read_text()
    spent = [float(e) for e in re.findall(r"epsilon ([\d.]+) \(local DP-SGD\)", log)]
    n = len(client_partitions(load_fl_config(cfg), build_dataset(load_fl_config(cfg).data.dataset))[0])
    q = 16 / n
    assert len(spent) == 3 and spent == sorted(spent)
    assert spent[-1] == pytest.approx(epsilon(1.5, q, 3 * round(1 / q), 1e-5), rel=2e-3)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 3
    saved = json.loads((tmp_path / "ledger0.json").read_text())  # written after every round
    assert saved["partition"] == 0 and saved["ledger"]["steps"] == 3 * round(1 / q)
