"""A federated run's privacy plan: the noise multiplier it will use and the epsilon it will spend.

``shoal fl privacy plan CONFIG`` prints it; a run builds with the same numbers.

1. The sampling rate q is ``clients_per_round / clients``: each aggregated
   round is one Poisson-subsampled Gaussian release at rate q (shoal samples
   a fixed number without replacement, the accountant's usual stand-in).
2. The noise multiplier is ``fl.privacy.noise_multiplier`` or, when only
   ``fl.privacy.target_epsilon`` is given, the smallest one whose PLD epsilon
   after ``fl.rounds`` rounds at ``delta`` fits the target
   (:func:`shoal.privacy.accountant.calibrate`).
3. The epsilon after a few milestones of the run (round 1, 10%, 50% and all
   of it), by PLD (the figure shoal reports) and by RDP (a looser cross-check).

Calibration runs when a plan or a federation is built, not when the config is
read: one PLD calibration takes seconds (about 3 s for 100 rounds at q = 0.1),
and every client process and ``shoal fl token`` read the config too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from rich.table import Table

from shoal.config import ConfigError
from shoal.fl.config import FederationConfig, FlRunConfig

MILESTONES = (0.1, 0.5)  # shares of fl.rounds, besides round 1 and the last


def sampling_rate(fl: FederationConfig) -> float:
    """q: the chance that one client takes part in a round."""
    return fl.sampling_rate


def with_noise_multiplier(cfg: FlRunConfig) -> FlRunConfig:
    """``cfg`` with ``fl.privacy.noise_multiplier`` filled in, calibrated to ``target_epsilon`` if it was not given.

    Raises :class:`ConfigError` naming ``fl.privacy.target_epsilon`` when no
    multiplier up to the accountant's largest can fit it.
    """
    privacy = cfg.fl.privacy
    if privacy is None or privacy.noise_multiplier is not None:
        return cfg
    try:
        sigma = _calibrate(privacy.target_epsilon, privacy.delta, sampling_rate(cfg.fl), cfg.fl.rounds)
    except ValueError as err:
        raise ConfigError(f"fl.privacy.target_epsilon: {err}; raise it or cut fl.rounds") from None
    privacy = privacy.model_copy(update={"noise_multiplier": sigma})
    return cfg.model_copy(update={"fl": cfg.fl.model_copy(update={"privacy": privacy})})


@functools.lru_cache(maxsize=64)
def _calibrate(target_epsilon: float, delta: float, q: float, rounds: int) -> float:
    # A pure function costing seconds (dp_accounting's own search, which the accountant's epsilon
    # cache does not see): a plan and the run built after it in one process pay it once.
    from shoal.privacy.accountant import calibrate

    return calibrate(target_epsilon, delta, q, rounds)


@dataclass
class PrivacyPlan:
    """What a run's privacy will be; ``epsilons`` is ``(round, PLD epsilon, RDP epsilon)`` per milestone."""

    mechanism: str
    clip: float
    adaptive: bool
    where: str
    sampling_rate: float
    clients_per_round: int
    rounds: int
    noise_multiplier: float
    calibrated: bool
    noise_std: float  # on the averaged update: z C / m (adaptive: z_delta C / m, at the initial C)
    delta: float
    target_epsilon: float | None
    epsilons: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        """PLD epsilon after the whole run."""
        return self.epsilons[-1][1]

    @property
    def fits(self) -> bool | None:
        """Whether the whole run fits target_epsilon (None without one)."""
        return None if self.target_epsilon is None else self.epsilon <= self.target_epsilon


def milestones(rounds: int) -> list[int]:
    """Round 1, 10% and 50% of the rounds, and the last, without repeats."""
    return sorted({1, rounds, *(max(1, math.ceil(share * rounds)) for share in MILESTONES)})


def privacy_plan(cfg: FlRunConfig) -> PrivacyPlan:
    """The privacy plan of a validated federated config; ValueError if it has no ``fl.privacy``."""
    from shoal.fl.privacy.dp_fedavg import count_noise
    from shoal.privacy.accountant import epsilon
    from shoal.privacy.clipping import delta_noise_multiplier

    if cfg.fl.privacy is None:
        raise ValueError("fl.privacy is not set: the run has no differential privacy to plan "
                         "(--set fl.privacy.target_epsilon=8, or fl.privacy.noise_multiplier=1.0)")
    calibrated = cfg.fl.privacy.noise_multiplier is None
    resolved = with_noise_multiplier(cfg)
    privacy, fl = resolved.fl.privacy, resolved.fl
    q, sigma = sampling_rate(fl), privacy.noise_multiplier
    update_sigma = sigma
    if privacy.adaptive:  # the count takes its share of the budget (Andrew et al. 2021)
        update_sigma = delta_noise_multiplier(sigma, count_noise(privacy, fl.clients_per_round))
    return PrivacyPlan(
        mechanism=privacy.mechanism, clip=privacy.clip, adaptive=privacy.adaptive, where=privacy.where,
        sampling_rate=q, clients_per_round=fl.clients_per_round, rounds=fl.rounds, noise_multiplier=sigma,
        calibrated=calibrated, noise_std=update_sigma * privacy.clip / fl.clients_per_round, delta=privacy.delta,
        target_epsilon=privacy.target_epsilon,
        epsilons=[(n, epsilon(sigma, q, n, privacy.delta), epsilon(sigma, q, n, privacy.delta, "rdp"))
                  for n in milestones(fl.rounds)])


def plan_table(plan: PrivacyPlan) -> Table:
    """The plan as ``shoal fl privacy plan`` prints it: the mechanism, then epsilon by round."""
    table = Table(title=f"privacy plan: {plan.mechanism}, epsilon at delta {plan.delta:g}")
    table.add_column("round", justify="right")
    table.add_column("share", justify="right")
    table.add_column("epsilon (PLD)", justify="right")
    table.add_column("epsilon (RDP)", justify="right")
    for rnd, pld, rdp in plan.epsilons:
        table.add_row(str(rnd), f"{100 * rnd / plan.rounds:.3g}%", f"{pld:.4g}", f"{rdp:.4g}")
    clip = f"{plan.clip:g}" + (" (initial; adaptive)" if plan.adaptive else "")
    how = f"calibrated to target_epsilon {plan.target_epsilon:g}" if plan.calibrated else "given"
    if plan.fits is None:
        fit = "no target_epsilon: accounted, not limited"
    else:
        fit = (f"{'yes' if plan.fits else 'no'}: epsilon {plan.epsilon:.4g} "
               f"{'<=' if plan.fits else '>'} target_epsilon {plan.target_epsilon:g}")
    lines = [
        f"noise multiplier {plan.noise_multiplier:.4g} ({how})",
        f"noise std on the mean {plan.noise_std:.4g}; clip {clip}, clipped by the {plan.where}",
        f"sampling rate q {plan.sampling_rate:.4g} ({plan.clients_per_round} clients a round), {plan.rounds} rounds",
        f"fits the budget: {fit}",
    ]
    table.caption, table.caption_justify = "\n".join(lines), "left"
    table.min_width = max(map(len, lines))  # the caption on whole lines, not wrapped to four narrow columns
    return table
