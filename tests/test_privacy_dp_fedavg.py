"""DP-FedAvg and adaptive clipping: the clip norm's quantile tracking, the noise's scale,
the bound on one client's influence, which strategies it wraps, and a short simulation."""

import json

import numpy as np
import pytest
import torch

from shoal.config import ConfigError
from shoal.fl.config import PrivacyConfig, load_fl_config
from shoal.fl.simulate import simulate
from shoal.fl.strategies.base import ClientResult, build_fed_strategy
from shoal.privacy.clipping import AdaptiveClip, clip, delta_noise_multiplier
from shoal.fl.privacy.dp_fedavg import DpFedAvg
from shoal.registry import FED_STRATEGIES, load_builtins

load_builtins()


def _dp(strategy="fedavg", m=10, **privacy):
    noise = privacy.pop("noise_multiplier", 1.0)
    options = PrivacyConfig(**{"noise_multiplier": 1.0, "reproducible_noise": True, **privacy})
    # The config refuses noise under 0.3; the maths tests below give a negligible one directly.
    options = options.model_copy(update={"noise_multiplier": noise})
    return DpFedAvg(build_fed_strategy(FED_STRATEGIES.resolve(strategy)), options, clients_per_round=m, seed=0)


def _results(deltas):
    return [ClientResult(str(k), d, 1, 0.0) for k, d in enumerate(deltas)]


def test_clip_scales_to_the_norm_and_says_whether_it_had_to():
    big, small = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    clipped, within = clip(big, 1.0)
    assert not within and torch.allclose(clipped, torch.tensor([0.6, 0.8]))
    assert clip(small, 1.0) == (small, True)


def _replay_adaptive(target, rounds=50, m=10, seed=0):
    """The clip norm after each of ``rounds`` rounds of m updates with norms ~ N(1, 0.1), from C = 0.1."""
    rng = np.random.default_rng(seed)
    dp = _dp(m=m, clip=0.1, adaptive=True, target_quantile=target, noise_multiplier=0.5)
    norms_c = []
    for rnd in range(1, rounds + 1):
        norms = rng.normal(1.0, 0.1, size=m)
        directions = torch.nn.functional.normalize(torch.randn(m, 8, generator=torch.Generator().manual_seed(rnd)))
        deltas = directions * torch.tensor(norms, dtype=torch.float32)[:, None]
        dp.aggregate(rnd, torch.zeros(8), _results(list(deltas)))
        norms_c.append(dp.clip_norm)
    return norms_c


def test_adaptive_clip_moves_up_to_the_target_quantile_of_the_norms():
    population = np.random.default_rng(99).normal(1.0, 0.1, size=100_000)
    # With eta = 0.2 each round moves C by up to ~10%, one std of these norms, so C keeps
    # oscillating by design; the settled value is the geometric mean of the last 10 rounds.
    median = _replay_adaptive(0.5)
    settled = float(np.exp(np.mean(np.log(median[-10:]))))
    assert median[-1] > 0.5 and settled > 0.5  # it rose from 0.1 towards norms of ~1 (Flower 1.42 moves it down)
    assert 0.4 <= (population <= median[-1]).mean() <= 0.6
    assert 0.4 <= (population <= settled).mean() <= 0.6
    high = _replay_adaptive(0.9)
    settled_high = float(np.exp(np.mean(np.log(high[-10:]))))
    assert settled_high > settled and 0.8 <= (population <= settled_high).mean() <= 1.0


def test_adaptive_clip_follows_the_geometric_rule():
    clip_state = AdaptiveClip(initial_norm=2.0, target_quantile=0.5, learning_rate=0.2, count_noise=0.0,
                              expected_clients=10)
    fraction = clip_state.update(8, torch.Generator().manual_seed(0))
    assert fraction == pytest.approx(0.8) and clip_state.norm == pytest.approx(2.0 * np.exp(-0.2 * 0.3))
    restored = AdaptiveClip(initial_norm=1.0, count_noise=0.0, expected_clients=10)
    restored.load_state_dict(clip_state.state_dict())
    assert restored.norm == pytest.approx(clip_state.norm)


def test_noise_budget_split_follows_andrew_et_al_and_refuses_a_small_count_noise():
    assert delta_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        delta_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="count_noise"):
        _dp(m=10, adaptive=True, noise_multiplier=1.0)  # sigma_b = 10/20 = 0.5, not above z/2


def test_noise_std_is_noise_multiplier_times_clip_over_expected_clients():
    from shoal.privacy.accountant import epsilon

    dp = _dp(m=10, clip=2.0, noise_multiplier=1.5)
    out = dp.aggregate(1, torch.zeros(200_000), _results([torch.zeros(200_000)] * 7))
    expected = 1.5 * 2.0 / 10
    assert float(out.std()) == pytest.approx(expected, rel=0.02) and abs(float(out.mean())) < 0.01 * expected
    assert dp.last_round == {"clip_norm": 2.0, "noise_std": pytest.approx(expected), "clipped_fraction": 0.0,
                             "epsilon": pytest.approx(epsilon(1.5, 1.0, 1, 1e-5))}  # m of m: sampling rate 1
    again = _dp(m=10, clip=2.0, noise_multiplier=1.5).aggregate(1, torch.zeros(200_000),
                                                                 _results([torch.zeros(200_000)] * 7))
    assert torch.equal(out, again)  # reproducible_noise: seeded by (seed, round)
    # By default the noise comes from the OS's entropy: the same config and seed do not repeat it.
    secret = [_dp(m=10, clip=2.0, noise_multiplier=1.5, reproducible_noise=False).aggregate(
        1, torch.zeros(1000), _results([torch.zeros(1000)] * 7)) for _ in range(2)]
    assert not torch.equal(secret[0], secret[1])


def test_clipping_bounds_one_clients_influence_to_clip_over_m():
    honest = [torch.full((4,), 0.1)] * 9
    base = _dp(m=10, clip=1.0, noise_multiplier=1e-9).aggregate(1, torch.zeros(4), _results(honest))
    dp = _dp(m=10, clip=1.0, noise_multiplier=1e-9)
    attacked = dp.aggregate(1, torch.zeros(4), _results(honest + [torch.full((4,), 1e6)]))
    assert float((attacked - base).norm()) <= 1.0 / 10 + 1e-6
    assert dp.last_round["clipped_fraction"] == pytest.approx(0.1)


def test_client_side_clipping_sends_the_norm_and_the_server_clips_again():
    dp = _dp(strategy="fedprox:mu=0.1", m=2, clip=1.0, where="client", noise_multiplier=1e-9)
    assert dp.client_config(1) == {"mu": 0.1, "clip_norm": 1.0}
    out = dp.aggregate(1, torch.zeros(2), _results([torch.tensor([0.6, 0.8]), torch.tensor([30.0, 40.0])]))
    assert torch.allclose(out, torch.tensor([0.6, 0.8]), atol=1e-6)
    assert dp.last_round["clipped_fraction"] == 1.0  # both arrived at the bound: both counted as clipped


def test_wrapping_fedadam_applies_its_step_to_the_noised_mean_and_keeps_its_state():
    dp = _dp(strategy="fedadam:eta=0.1", m=2, clip=10.0, noise_multiplier=1e-9, adaptive=True, count_noise=1.0)
    out = dp.aggregate(1, torch.zeros(2), _results([torch.tensor([1.0, -1.0])] * 2))
    # Adam's first step from m = v = 0 on the mean g = (1, -1): eta (1-b1) g / (sqrt(1-b2) |g| + tau)
    step = 0.1 * 0.1 / (0.1 + 1e-3)
    assert torch.allclose(out, torch.tensor([step, -step]), atol=1e-6)
    state = dp.state_dict()
    assert {"inner.m", "inner.v", "clip_norm"} <= set(state)
    fresh = _dp(strategy="fedadam:eta=0.1", m=2, clip=10.0, noise_multiplier=1e-9, adaptive=True, count_noise=1.0)
    fresh.load_state_dict(state)
    assert fresh.clip_norm == dp.clip_norm and torch.equal(fresh.inner.m, dp.inner.m)


@pytest.mark.parametrize("strategy", ["fedmedian", "trimmed_mean:beta=0.2"])
def test_robust_aggregators_that_are_not_a_mean_are_refused(strategy):
    with pytest.raises(ValueError, match="does not average"):
        _dp(strategy=strategy)
    with pytest.raises(ConfigError, match="does not average"):
        load_fl_config({"fl": {"strategy": strategy, "clients": 10, "clients_per_round": 4}},
                       ["fl.privacy.noise_multiplier=1.0"])


def _sim(tmp_path, *overrides):
    base = {
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[32]",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "fl": {"clients": 10, "clients_per_round": 10, "rounds": 8, "eval_every": 4}, "out": str(tmp_path),
    }
    if any(o.startswith("fl.privacy.") for o in overrides):
        overrides = (*overrides, "fl.privacy.reproducible_noise=true")  # the same figures on every run
    return simulate(base, overrides=list(overrides), progress=False)


def test_simulation_with_privacy_records_clip_and_noise_and_heavy_noise_hurts(tmp_path):
    plain = _sim(tmp_path / "plain")
    private = _sim(tmp_path / "dp", "fl.privacy.noise_multiplier=0.5", "fl.privacy.clip=1.0",
                   "fl.privacy.adaptive=true", "fl.privacy.count_noise=1.0", "fl.privacy.where=client")
    lines = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all({"clip_norm", "noise_std", "clipped_fraction"} <= set(r) for r in lines)
    assert lines[0]["clip_norm"] == 1.0 and lines[-1]["clip_norm"] != 1.0  # adaptive: it moved
    noisy = _sim(tmp_path / "noisy", "fl.privacy.noise_multiplier=50", "fl.privacy.clip=1.0")
    assert noisy["final_accuracy"] < plain["final_accuracy"] - 0.3
    assert private["final_accuracy"] > noisy["final_accuracy"]


def test_the_budget_is_spent_one_round_at_a_time_refused_past_its_target_and_saved():
    from shoal.privacy.accountant import BudgetExhausted, epsilon

    dp = DpFedAvg(build_fed_strategy(FED_STRATEGIES.resolve("fedavg")),
                  PrivacyConfig(noise_multiplier=1.0, target_epsilon=epsilon(1.0, 0.1, 3, 1e-5) * 1.001),
                  clients_per_round=10, seed=0, clients=100)
    for rnd in (1, 2, 3):
        assert dp.round_allowed()
        dp.aggregate(rnd, torch.zeros(4), _results([torch.zeros(4)] * 10))
        assert dp.last_round["epsilon"] == pytest.approx(epsilon(1.0, 0.1, rnd, 1e-5))
    assert not dp.round_allowed()
    with pytest.raises(BudgetExhausted):
        dp.aggregate(4, torch.zeros(4), _results([torch.zeros(4)] * 10))
    again = DpFedAvg(build_fed_strategy(FED_STRATEGIES.resolve("fedavg")), dp.options, clients_per_round=10,
                     seed=0, clients=100)
    again.load_state_dict(dp.state_dict())  # a restarted server: neither reset nor spent twice
    assert again.ledger.steps == 3 and not again.round_allowed()


def test_a_planned_run_that_cannot_fit_its_budget_is_a_config_error_naming_the_epsilon():
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon: 400 rounds at noise_multiplier 1 .*would "
                                          r"spend epsilon [0-9.]+ > 1"):
        load_fl_config({"fl": {"clients": 100, "clients_per_round": 10, "rounds": 400}},
                       ["fl.privacy.noise_multiplier=1.0", "fl.privacy.target_epsilon=1"])


def test_every_round_logs_its_epsilon_and_the_summary_states_the_guarantee(tmp_path):
    from shoal.privacy.accountant import epsilon

    summary = _sim(tmp_path / "dp", "fl.privacy.noise_multiplier=1.0", "fl.clients=20", "fl.clients_per_round=5")
    lines = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    spent = [r["epsilon"] for r in lines]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(epsilon(1.0, 0.25, 8, 1e-5))
    privacy = summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(spent[-1]) and privacy["delta"] == 1e-5
    assert privacy["noise_multiplier"] == 1.0 and privacy["rdp_epsilon"] >= privacy["epsilon"]


# --- the noise calibrated to target_epsilon, and shoal fl privacy plan --------------------------

# 8 rounds of 5 of 20 clients (q = 0.25) at target epsilon 3: one calibration, about 3 s (cached after).
CALIBRATED = {"clients": 20, "clients_per_round": 5, "rounds": 8, "eval_every": 4}


def _calibrated_config(tmp_path, target_epsilon=3.0):
    config = tmp_path / "fl.yaml"
    config.write_text(json.dumps({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[32]",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "fl": {**CALIBRATED, "privacy": {"target_epsilon": target_epsilon, "reproducible_noise": True}},
        "out": str(tmp_path / "run"),
    }))  # JSON is YAML
    return config


def _calibrated_sigma(tmp_path):
    from shoal.fl.privacy.plan import with_noise_multiplier

    return with_noise_multiplier(load_fl_config(_calibrated_config(tmp_path))).fl.privacy.noise_multiplier


def test_calibration_gives_the_smallest_noise_whose_pld_epsilon_fits_the_target(tmp_path):
    from shoal.privacy.accountant import epsilon

    sigma = _calibrated_sigma(tmp_path)

    spent = epsilon(sigma, 0.25, 8, 1e-5)
    assert 0.97 * 3.0 <= spent <= 3.0
    assert epsilon(sigma * 0.98, 0.25, 8, 1e-5) > 3.0  # 2% less noise would not fit: it is the smallest


def test_privacy_plan_prints_the_calibrated_noise_and_the_epsilon_by_round(tmp_path):
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.privacy.accountant import epsilon

    sigma = _calibrated_sigma(tmp_path)

    table = CliRunner().invoke(app, ["fl", "privacy", "plan", str(_calibrated_config(tmp_path))],
                               env={"COLUMNS": "120"})
    as_json = CliRunner().invoke(app, ["fl", "privacy", "plan", str(_calibrated_config(tmp_path)), "--json"])

    assert table.exit_code == 0, table.output
    assert f"noise multiplier {sigma:.4g} (calibrated to target_epsilon 3)" in table.stdout
    assert "epsilon (PLD)" in table.stdout and f"{epsilon(sigma, 0.25, 8, 1e-5):.4g}" in table.stdout
    assert "fits the budget: yes" in table.stdout
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.stdout)
    assert plan["noise_multiplier"] == sigma and plan["calibrated"] and plan["fits"] is True
    assert [r for r, _, _ in plan["epsilons"]] == [1, 4, 8] and plan["epsilon"] <= 3.0


@pytest.mark.processes
def test_privacy_plan_exits_2_naming_the_target_when_no_noise_can_fit_it(tmp_path):
    from tests.conftest import invoke_cli

    result = invoke_cli("fl", "privacy", "plan", str(_calibrated_config(tmp_path, target_epsilon=1e-4)))

    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.stdout + result.stderr
    assert message.startswith("config error: fl.privacy.target_epsilon: target_epsilon=0.0001 is out of reach")
    assert "even noise_multiplier=1000.0 gives epsilon=" in message


@pytest.mark.processes
def test_simulate_with_only_a_target_epsilon_runs_on_the_calibrated_noise(tmp_path):
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.privacy.accountant import epsilon

    sigma = _calibrated_sigma(tmp_path)

    result = CliRunner().invoke(app, ["fl", "simulate", str(_calibrated_config(tmp_path))])

    assert result.exit_code == 0, result.output
    assert f"noise multiplier {sigma:.4g}, calibrated to target_epsilon 3" in result.stdout
    privacy = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert privacy["noise_multiplier"] == sigma and privacy["noise_calibrated"] and privacy["steps"] == 8
    assert privacy["epsilon"] == pytest.approx(epsilon(sigma, 0.25, 8, 1e-5)) and privacy["epsilon"] <= 3.0
    assert not privacy["stopped_by_budget"]  # the planned run spends its budget, and ends at fl.rounds
    saved = load_fl_config(tmp_path / "run" / "config.yaml")  # the noise the run used, and still valid
    assert saved.fl.privacy.noise_multiplier == sigma


def test_a_restart_under_other_privacy_settings_is_refused_not_merged():
    from shoal.fl import wire

    def dp(**options):
        return DpFedAvg(build_fed_strategy(FED_STRATEGIES.resolve("fedavg")),
                        PrivacyConfig(**{"noise_multiplier": 1.0, "target_epsilon": 50.0, **options}),
                        clients_per_round=10, seed=0, clients=100)

    spent = dp()
    spent.aggregate(1, torch.zeros(4), _results([torch.zeros(4)] * 10))
    _, stored = wire.unpack(wire.pack({}, spent.state_dict()))  # as the server stores it

    same = dp()
    same.load_state_dict(stored)
    assert same.ledger.steps == 1
    for changed, name in (({"noise_multiplier": 1.1}, "noise_multiplier"), ({"target_epsilon": 60.0}, "target_epsilon"),
                          ({"target_epsilon": None}, "target_epsilon")):
        with pytest.raises(ValueError, match=f"ledger state has {name}=.*cannot change settings mid-run"):
            dp(**changed).load_state_dict(stored)
