"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, and the budget as a hard limit.

Each round (FL) or step (DP-SGD) releases a clipped sum with Gaussian noise of
standard deviation ``noise_multiplier * clip_norm``, over a Poisson sample in
which every client (or example) takes part with probability ``sampling_rate``.
``steps`` such releases compose; the guarantee is (epsilon, delta)-DP under
add/remove-one adjacency.

1. Describe the run as a ``dp_event``: ``SelfComposed(PoissonSampled(q,
   Gaussian(sigma)), steps)``; with q = 1 the sampling is dropped.
2. Compose it in a privacy loss distribution accountant (PLD; Koskela et al.
   2020, Doroshenko et al. 2022, as in Google's ``dp-accounting``), the tight
   figure we report, or in an RDP accountant (Mironov 2017; Mironov, Talwar
   and Zhang 2019), a looser upper bound kept as a cross-check. Abadi et al.
   2016 (the moments accountant) is RDP's ancestor. With q = 1 the "pld"
   figure is the exact Gaussian one (Balle and Wang 2018) in closed form.
3. Read epsilon at the target delta.

``calibrate`` inverts step 1-3 for the noise multiplier. ``Ledger`` holds one
run's spend: it refuses the step that would take epsilon past the target and
checkpoints as a plain dict, so the FL store and the training checkpoint can
write it in the same transaction as the round it pays for.

Pure maths: no torch, no shoal training imports.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

# calibrate searches only inside this range. Below it epsilon is in the
# hundreds for any useful run and PLD slows sharply (100 steps at q = 0.1:
# 0.5 s at sigma 1, 2.3 s at 0.3, 22 s at 0.1); above it the noise swamps
# any update.
MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 1000.0

ACCOUNTANTS = ("pld", "rdp")
_STATE_KEYS = frozenset({"noise_multiplier", "sampling_rate", "delta", "target_epsilon", "steps"})


class BudgetExhausted(RuntimeError):
    """The next step would take the spent epsilon past the target."""


def _check_real(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def _check_steps(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_mechanism(noise_multiplier: Any, sampling_rate: Any, delta: Any) -> tuple[float, float, float]:
    return (
        _check_real("noise_multiplier", noise_multiplier, 0.0, math.inf, low_open=True, high_open=True),
        _check_real("sampling_rate", sampling_rate, 0.0, 1.0, low_open=True, high_open=False),
        _check_real("delta", delta, 0.0, 1.0, low_open=True, high_open=True),
    )


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event for ``steps`` Poisson-subsampled Gaussian releases."""
    step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(sampling_rate, step)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld.PLDAccountant()
    if accountant == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` after ``steps`` releases (0.0 for none); ``accountant`` is "pld" or "rdp"."""
    noise_multiplier, sampling_rate, delta = _check_mechanism(noise_multiplier, sampling_rate, delta)
    steps = _check_steps("steps", steps, 0)
    _make_accountant(accountant)  # the name checked before the cache sees it
    return _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str) -> float:
    # A pure function of checked arguments, and a PLD composition costs a good part of a second:
    # many ledgers of one mechanism (the clients of a federation) share each figure.
    engine = _make_accountant(accountant)
    if steps == 0:
        return 0.0
    if sampling_rate == 1.0 and accountant == "pld":
        # Without sampling, k Gaussian releases with sigma compose exactly into
        # one with sigma / sqrt(k): a closed form, where PLD would discretise
        # (and, for large k, run out of memory).
        return float(dp_accounting.get_epsilon_gaussian(noise_multiplier / math.sqrt(steps), delta))
    engine.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(engine.get_epsilon(delta))


def calibrate(target_epsilon: float, delta: float, sampling_rate: float, steps: int, *, tol: float = 1e-3) -> float:
    """The smallest noise multiplier whose PLD epsilon after ``steps`` is <= ``target_epsilon``.

    1. Bracket the answer by doubling or halving sigma from 1 inside
       [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]; a target missed even at
       the top is a ValueError, one met even at the bottom returns the bottom.
    2. Solve inside the bracket with ``dp_accounting.calibrate_dp_mechanism``
       (Brent's method on PLD epsilon), which returns a sigma within ``tol``
       above the exact one, never below: its epsilon meets the target.
    """
    target_epsilon = _check_real("target_epsilon", target_epsilon, 0.0, math.inf, low_open=True, high_open=True)
    _, sampling_rate, delta = _check_mechanism(1.0, sampling_rate, delta)
    steps = _check_steps("steps", steps, 1)
    tol = _check_real("tol", tol, 0.0, 1.0, low_open=True, high_open=False)

    @functools.cache
    def at(sigma: float) -> float:
        return epsilon(sigma, sampling_rate, steps, delta)

    # calibrate_dp_mechanism's brentq needs a bracket with a sign change.
    # Find one a factor of 2 wide by walking from sigma = 1, so that the
    # expensive small multipliers are visited only when the target needs them.
    low, high = 1.0, 1.0
    while at(high) > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon} is out of reach: even noise_multiplier={MAX_NOISE_MULTIPLIER} "
                f"gives epsilon={at(high):.4g} at delta={delta} after {steps} steps with "
                f"sampling_rate={sampling_rate}"
            )
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
    while low == high or at(low) <= target_epsilon:
        if low <= MIN_NOISE_MULTIPLIER:
            return MIN_NOISE_MULTIPLIER
        high, low = low, max(low / 2, MIN_NOISE_MULTIPLIER)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            pld.PLDAccountant,
            lambda sigma: dp_event(sigma, sampling_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
            tol=tol,
        )
    )


class Ledger:
    """One run's privacy spend: a fixed mechanism, a step count, and an optional hard target.

    ``would_exceed`` and ``spend`` share one PLD computation per step: the
    epsilon for ``steps + n`` is computed once, and becomes ``spent()`` when
    those steps are spent.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        target_epsilon: float | None = None,
        steps: int = 0,
    ) -> None:
        self.noise_multiplier, self.sampling_rate, self.delta = _check_mechanism(noise_multiplier, sampling_rate, delta)
        self.target_epsilon = (
            None
            if target_epsilon is None
            else _check_real("target_epsilon", target_epsilon, 0.0, math.inf, low_open=True, high_open=True)
        )
        self.steps = _check_steps("steps", steps, 0)
        self._epsilon_at: dict[int, float] = {}
        self._fits_up_to = 0  # a step count known to fit the target (epsilon only grows with steps)

    def _epsilon(self, steps: int) -> float:
        if steps not in self._epsilon_at:
            self._epsilon_at[steps] = epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta)
        return self._epsilon_at[steps]

    def spent(self) -> float:
        """PLD epsilon of the steps spent so far."""
        return self._epsilon(self.steps)

    def would_exceed(self, next_steps: int = 1) -> bool:
        """Whether spending ``next_steps`` more would take epsilon past the target (never, without one)."""
        next_steps = _check_steps("next_steps", next_steps, 1)
        if self.target_epsilon is None or self.steps + next_steps <= self._fits_up_to:
            return False
        if self._epsilon(self.steps + next_steps) > self.target_epsilon:
            return True
        self._fits_up_to = self.steps + next_steps
        return False

    def spend(self, steps: int = 1) -> float:
        """Record ``steps`` releases and return the new epsilon; raises BudgetExhausted instead of overspending."""
        self.record(steps)
        return self.spent()

    def record(self, steps: int = 1) -> None:
        """Record ``steps`` releases, as :meth:`spend` does, without computing the new epsilon: a
        count already known to fit (``would_exceed`` of a whole planned run) costs nothing, so a
        DP-SGD step need not pay a PLD composition. Raises BudgetExhausted instead of overspending."""
        steps = _check_steps("steps", steps, 1)
        if self.would_exceed(steps):
            raise BudgetExhausted(
                f"privacy budget exhausted: spent epsilon={self.spent():.4g} after {self.steps} steps; "
                f"{steps} more would reach {self._epsilon(self.steps + steps):.4g}, "
                f"past target_epsilon={self.target_epsilon} (delta={self.delta})"
            )
        self.steps += steps
        # Only the current and future counts can be asked for again.
        self._epsilon_at = {n: e for n, e in self._epsilon_at.items() if n >= self.steps}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as a JSON-able dict."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the spend in ``state``; the mechanism and target must be this ledger's own.

        A checkpoint written under another noise multiplier, sampling rate,
        delta or target is refused rather than merged: the spend it records was
        paid under those settings, and changing the target on resume would
        reset the budget.
        """
        restored = Ledger.from_state_dict(state)
        for name in ("noise_multiplier", "sampling_rate", "delta", "target_epsilon"):
            if getattr(restored, name) != getattr(self, name):
                raise ValueError(
                    f"ledger state has {name}={getattr(restored, name)!r} but this run has "
                    f"{name}={getattr(self, name)!r}; a privacy budget cannot change settings mid-run"
                )
        self.steps = restored.steps
        self._epsilon_at, self._fits_up_to = {}, 0

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Ledger:
        """A ledger rebuilt from ``state_dict()`` alone."""
        # The state comes back from a store or a checkpoint file: check its shape
        # here, and every value through the constructor.
        if not isinstance(state, dict) or set(state) != _STATE_KEYS:
            raise ValueError(f"ledger state must be a dict with keys {sorted(_STATE_KEYS)}, got {state!r}")
        return cls(**state)

    def report(self) -> dict[str, Any]:
        """The guarantee so far, for summary.json; rdp_epsilon is the looser RDP bound, a cross-check."""
        return {
            "epsilon": self.spent(),
            "delta": self.delta,
            "accountant": "pld",
            "rdp_epsilon": epsilon(self.noise_multiplier, self.sampling_rate, self.steps, self.delta, "rdp"),
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
        }
