"""The privacy accountant: epsilon against dp_accounting directly, calibration, and the ledger as a hard budget."""

import json
import time

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from shoal.privacy import accountant
from shoal.privacy.accountant import BudgetExhausted, Ledger, calibrate, epsilon

DELTA = 1e-5


def _direct(accountant, sigma, q, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps", [(0.1, 1.0, 100), (0.02, 0.8, 500), (0.5, 2.0, 20)])
def test_epsilon_equals_a_direct_dp_accounting_computation(q, sigma, steps):
    assert epsilon(sigma, q, steps, DELTA) == pytest.approx(_direct(pld.PLDAccountant(), sigma, q, steps, DELTA))
    assert epsilon(sigma, q, steps, DELTA, accountant="rdp") == pytest.approx(
        _direct(rdp.RdpAccountant(), sigma, q, steps, DELTA)
    )


def test_full_participation_is_the_plain_gaussian_composed():
    # q = 1: no amplification by sampling; k Gaussians with sigma compose into
    # one with sigma / sqrt(k). The closed form agrees with PLD (an upper
    # bound, from discretisation) and with RDP above both.
    exact = epsilon(2.0, 1.0, 10, DELTA)
    assert exact == pytest.approx(dp_accounting.get_epsilon_gaussian(2.0 / 10**0.5, DELTA))
    direct_pld = pld.PLDAccountant().compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 10)
    ).get_epsilon(DELTA)
    assert exact <= direct_pld == pytest.approx(exact, rel=1e-2)
    assert epsilon(2.0, 1.0, 10, DELTA, accountant="rdp") >= exact


@pytest.mark.parametrize("q, sigma, steps", [(0.1, 1.0, 200), (0.01, 1.1, 2000), (1.0, 5.0, 50)])
def test_rdp_is_a_looser_bound_than_pld_but_close(q, sigma, steps):
    tight = epsilon(sigma, q, steps, DELTA)
    loose = epsilon(sigma, q, steps, DELTA, accountant="rdp")
    assert tight <= loose <= 2 * tight


def test_mnist_dp_sgd_reference_figure():
    # Abadi et al. 2016's MNIST setup as in TF Privacy's tutorial: batch 256 of
    # 60,000 (q = 0.00427), sigma = 1.1, 60 epochs, delta = 1e-5; RDP reports
    # about 3.0 there (older RDP orders; 2.60 here), PLD gives 2.38.
    q = 256 / 60000
    steps = 60 * 60000 // 256
    tight = epsilon(1.1, q, steps, DELTA)
    assert 1.5 < tight < 3.2
    assert tight <= epsilon(1.1, q, steps, DELTA, accountant="rdp") < 3.5


def test_epsilon_grows_with_steps_and_is_zero_before_any():
    assert epsilon(1.0, 0.1, 0, DELTA) == 0.0
    assert 0 < epsilon(1.0, 0.1, 10, DELTA) < epsilon(1.0, 0.1, 100, DELTA)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_epsilon_rejects_bad_inputs_naming_the_argument(kwargs, name):
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": DELTA} | kwargs
    with pytest.raises(ValueError, match=name):
        epsilon(**args)


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.1, 100), (4.0, 0.05, 300)])
def test_calibrate_round_trips(target, q, steps):
    sigma = calibrate(target, DELTA, q, steps)
    assert epsilon(sigma, q, steps, DELTA) <= target
    assert epsilon(sigma - 0.01, q, steps, DELTA) > target


def test_calibrate_says_when_no_multiplier_fits():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(1e-6, DELTA, 1.0, 10**6)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(0.0, DELTA, 0.1, 10)
    with pytest.raises(ValueError, match="steps"):
        calibrate(1.0, DELTA, 0.1, 0)


def _ledger(**overrides):
    # sigma 4 at q = 0.1 reaches epsilon 0.5 in about 27 steps: quick to exhaust.
    settings = {"noise_multiplier": 4.0, "sampling_rate": 0.1, "delta": DELTA, "target_epsilon": 0.5}
    return Ledger(**(settings | overrides))


def _first_refused_step(ledger):
    while not ledger.would_exceed():
        ledger.spend()
    return ledger.steps


def test_ledger_refuses_the_step_that_would_exceed():
    ledger = _ledger()
    last = _first_refused_step(ledger)
    assert last >= 5
    assert ledger.spent() <= 0.5 < epsilon(4.0, 0.1, last + 1, DELTA)
    with pytest.raises(BudgetExhausted, match=r"spent epsilon=.*target_epsilon=0\.5"):
        ledger.spend()
    assert ledger.steps == last  # a refused spend records nothing


def test_ledger_without_a_target_never_refuses():
    ledger = _ledger(target_epsilon=None)
    assert not ledger.would_exceed(10_000)
    assert ledger.spend(5) == pytest.approx(epsilon(4.0, 0.1, 5, DELTA))


def test_ledger_state_round_trips_through_json_without_reset_or_double_spend():
    reference = _ledger()
    last = _first_refused_step(reference)

    ledger = _ledger()
    ledger.spend(last // 2)
    saved = json.loads(json.dumps(ledger.state_dict()))
    resumed = _ledger()
    resumed.load_state_dict(saved)

    assert resumed.steps == last // 2
    assert resumed.spent() == pytest.approx(ledger.spent())
    assert _first_refused_step(resumed) == last
    assert Ledger.from_state_dict(saved).state_dict() == saved


@pytest.mark.parametrize(
    "field, value", [("noise_multiplier", 2.0), ("sampling_rate", 0.2), ("delta", 1e-6), ("target_epsilon", 5.0)]
)
def test_ledger_refuses_state_from_other_settings(field, value):
    state = _ledger(**{field: value}).state_dict()
    with pytest.raises(ValueError, match=field):
        _ledger().load_state_dict(state)


@pytest.mark.parametrize(
    "state", [{"steps": 3}, {**_ledger().state_dict(), "steps": -1}, {**_ledger().state_dict(), "extra": 1}, [1, 2]]
)
def test_ledger_refuses_malformed_state(state):
    with pytest.raises(ValueError):
        _ledger().load_state_dict(state)


def test_ledger_rejects_bad_settings_naming_the_field():
    with pytest.raises(ValueError, match="target_epsilon"):
        _ledger(target_epsilon=-1.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        _ledger(sampling_rate=0.0)
    with pytest.raises(ValueError, match="next_steps"):
        _ledger().would_exceed(0)


def test_ledger_report_for_the_summary():
    ledger = _ledger(target_epsilon=None)
    ledger.spend(50)
    report = ledger.report()
    assert report["accountant"] == "pld"
    assert report["epsilon"] <= report["rdp_epsilon"]
    assert report["steps"] == 50 and report["delta"] == DELTA and report["noise_multiplier"] == 4.0
    json.dumps(report)


def test_a_round_costs_one_pld_computation(monkeypatch):
    # would_exceed then spend then spent, as a server does each round,
    # computes epsilon once (for steps + 1).
    ledger = _ledger(target_epsilon=100.0)
    ledger.spend(500)
    calls = []
    real = accountant.epsilon
    monkeypatch.setattr(accountant, "epsilon", lambda *args: calls.append(args) or real(*args))
    for _ in range(3):
        assert not ledger.would_exceed()
        ledger.spend()
        ledger.spent()
    assert [args[2] for args in calls] == [501, 502, 503]


def test_pld_for_1000_steps_is_fast():
    start = time.perf_counter()
    epsilon(1.0, 0.1, 1000, DELTA)
    assert time.perf_counter() - start < 5.0  # about 0.5 s measured; loose for loaded CI machines
