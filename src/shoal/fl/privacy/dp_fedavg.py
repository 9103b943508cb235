"""DP-FedAvg: client-level differential privacy around any mean-based server strategy.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR), with the adaptive clip norm of Andrew et al. 2021,
"Differentially Private Learning with Adaptive Clipping" (NeurIPS). Each round:

1. every client's update is clipped to L2 norm C (by the server, or by the
   client before it leaves with ``where: client``; the server clips again,
   so an update over C never counts for more);
2. the clipped updates are summed and divided by m = ``clients_per_round``,
   the *expected* number of participants, not by the number that answered:
   with a fixed denominator one client moves the mean by at most C/m whatever
   the others do, which is the sensitivity the noise is scaled to;
3. Gaussian noise of std z * C / m is added (z the noise multiplier; with
   adaptive clipping z_delta, the share of the budget left after the count,
   :func:`~shoal.privacy.clipping.delta_noise_multiplier`);
4. the inner strategy gets ONE result holding that noised mean, so FedAvg,
   FedAvgM, FedAdam/Yogi/Adagrad, FedProx or FedSGD apply their own server
   step to it;
5. with ``adaptive``, C moves towards ``target_quantile`` of the update norms
   (:class:`~shoal.privacy.clipping.AdaptiveClip`), after the round.

The noise is drawn from a ``torch.Generator`` seeded from the operating
system's entropy once per process (``secrets``), then by round: nobody who
reads the config can subtract it. ``reproducible_noise: true`` seeds it from
the run's seed instead, for tests and research, and is then only as secret as
the seed (which the run's config.yaml records). The
per-round record (``clip_norm``, ``noise_std``, ``clipped_fraction``) is the
server's view and is not itself noised.
"""

from __future__ import annotations

import math
import secrets

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shoal.fl.strategies.base import ClientResult, FedStrategy
from shoal.privacy.accountant import Ledger
from shoal.privacy.clipping import AdaptiveClip, clip, delta_noise_multiplier

if TYPE_CHECKING:  # the config validates with check_privacy: no import back at run time
    from shoal.fl.config import PrivacyConfig

log = logging.getLogger("shoal.privacy")

AT_BOUND = 1e-4  # relative: a client-clipped update arrives with norm C up to float (and codec) rounding
_LEDGER_SETTINGS = ("noise_multiplier", "sampling_rate", "delta", "target_epsilon")  # target None: NaN


def check_privacy(options: PrivacyConfig, strategy: type, clients_per_round: int) -> None:
    """Raise ``ValueError`` for a strategy DP-FedAvg cannot wrap or a count noise too small for z."""
    if not getattr(strategy, "aggregates_mean", False):  # its sensitivity would not be C/m
        raise ValueError(f"privacy: {strategy.__name__} does not average the updates, so DP-FedAvg's noise "
                         "(scaled to a mean's sensitivity C/m) would not cover it; use fedavg, fedavgm, fedprox, "
                         "fedsgd, fedadam, fedyogi or fedadagrad")
    if options.adaptive and options.noise_multiplier is not None:  # else checked once it is calibrated
        delta_noise_multiplier(options.noise_multiplier, count_noise(options, clients_per_round))


def count_noise(options: PrivacyConfig, clients_per_round: int) -> float:
    """sigma_b: the configured one, or Andrew et al.'s clients_per_round / 20."""
    return options.count_noise if options.count_noise is not None else clients_per_round / 20


class DpFedAvg(FedStrategy):
    """Clip each update to C, average over the expected clients, add N(0, (z C/m)^2), hand on (McMahan et al. 2018).

    Wraps a strategy rather than being one: it subclasses :class:`FedStrategy`
    for its interface only and delegates sampling, client options and the
    server step to ``inner``.
    """

    def __init__(self, inner: FedStrategy, options: PrivacyConfig, *, clients_per_round: int, seed: int,
                 clients: int | None = None):
        if options.noise_multiplier is None:
            raise ValueError("privacy: noise_multiplier is not set; calibrate it to target_epsilon first "
                             "(shoal.fl.privacy.plan.with_noise_multiplier)")
        check_privacy(options, type(inner), clients_per_round)
        super().__init__(options)
        self.inner = inner
        self.clients_per_round = clients_per_round
        # The noise's secret: the OS's entropy, unless the run asks for reproducible noise.
        self.seed = seed if options.reproducible_noise else secrets.randbits(63)
        self.adaptive: AdaptiveClip | None = None
        self.delta_multiplier = options.noise_multiplier
        self.fixed_norm = options.clip
        if options.adaptive:
            sigma_b = count_noise(options, clients_per_round)
            self.adaptive = AdaptiveClip(initial_norm=options.clip, target_quantile=options.target_quantile,
                                         learning_rate=options.clip_lr, count_noise=sigma_b,
                                         expected_clients=clients_per_round)
            self.delta_multiplier = delta_noise_multiplier(options.noise_multiplier, sigma_b)
        self.last_round: dict[str, Any] = {}
        # The budget: each aggregated round is one Poisson-subsampled Gaussian release at
        # rate clients_per_round / clients (shoal samples a fixed number without replacement,
        # the accountant's usual stand-in for it). Saved with the strategy's state, which the
        # server stores in the round's own transaction.
        self.ledger = Ledger(noise_multiplier=options.noise_multiplier,
                             sampling_rate=min(1.0, clients_per_round / (clients or clients_per_round)),
                             delta=options.delta, target_epsilon=options.target_epsilon)

    def round_allowed(self) -> bool:
        """Whether one more round fits the budget (always, without a target)."""
        return not self.ledger.would_exceed(1)

    @property
    def clip_norm(self) -> float:
        """The C this round's updates are clipped to."""
        return self.adaptive.norm if self.adaptive is not None else self.fixed_norm

    def sample(self, rnd: int, available: list[str], count: int, rng: np.random.Generator) -> list[str]:
        return self.inner.sample(rnd, available, count, rng)

    def client_config(self, rnd: int) -> dict[str, Any]:
        config = dict(self.inner.client_config(rnd))
        if self.options.where == "client":
            config["clip_norm"] = self.clip_norm
        return config

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        spent = self.ledger.spend(1)  # BudgetExhausted before any noise is drawn or weights change
        m, norm = self.clients_per_round, self.clip_norm
        generator = torch.Generator().manual_seed(_round_seed(self.seed, rnd))
        total = torch.zeros_like(results[0].delta)
        within = 0
        for r in results:
            clipped, ok = clip(r.delta, norm)
            if self.options.where == "client":
                length = float(r.delta.norm())
                if length > norm * (1 + AT_BOUND):
                    log.warning("round %d: %s's update has norm %.4g over the clip norm %.4g; clipped",
                                rnd, r.client, length, norm)
                # The client clipped already: an update it had to clip arrives at norm C, one it
                # did not strictly inside, which is what b_i (was it within C?) needs.
                ok = length < norm * (1 - AT_BOUND)
            within += ok
            total.add_(clipped)
        std = self.delta_multiplier * norm / m
        noised = total / m + torch.randn(total.shape, generator=generator, dtype=total.dtype) * std
        loss = sum(r.loss for r in results) / len(results)
        new_weights = self.inner.aggregate(rnd, weights, [ClientResult("dp_fedavg", noised, 1, loss)])
        if self.adaptive is not None:
            self.adaptive.update(within, generator)
        self.last_round = {"clip_norm": norm, "noise_std": std, "clipped_fraction": 1 - within / len(results),
                           "epsilon": spent}
        return new_weights

    def aggregate_sum(self, rnd: int, weights: torch.Tensor, total: torch.Tensor, loss: float, *,
                      rounding: float = 0.0) -> torch.Tensor:
        """Distributed DP (under secure aggregation): ``total`` is the sum of client-clipped updates that
        already carries the clients' noise, std z * (C + ``rounding``) in all; divide by m, spend, hand on."""
        if self.adaptive is not None:
            raise ValueError("privacy: adaptive clipping needs each update, which secure aggregation hides")
        spent = self.ledger.spend(1)
        m, norm = self.clients_per_round, self.clip_norm
        new_weights = self.inner.aggregate(rnd, weights, [ClientResult("dp_fedavg", total / m, 1, loss)])
        self.last_round = {"clip_norm": norm, "noise_std": self.delta_multiplier * (norm + rounding) / m,
                           "epsilon": spent, "noise_added_by": "clients"}
        return new_weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        state["privacy_rounds"] = torch.tensor([self.ledger.steps], dtype=torch.int64)  # the budget spent
        # What it was spent under, so that a restart with other settings is refused, not merged.
        ledger = self.ledger.state_dict()
        state["privacy_ledger"] = torch.tensor(
            [math.nan if ledger[k] is None else ledger[k] for k in _LEDGER_SETTINGS], dtype=torch.float64)
        if self.adaptive is not None:
            state.update(self.adaptive.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict({k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")})
        if self.adaptive is not None and "clip_norm" in state:
            self.adaptive.load_state_dict(state)
        if "privacy_rounds" in state:  # a restarted server goes on from the budget already spent
            restored = {**self.ledger.state_dict(), "steps": int(state["privacy_rounds"][0])}
            if "privacy_ledger" in state:  # absent in state stored before it was kept
                settings = [float(x) for x in state["privacy_ledger"].tolist()]
                restored.update({k: None if math.isnan(v) else v for k, v in zip(_LEDGER_SETTINGS, settings)})
            self.ledger.load_state_dict(restored)  # ValueError when the noise, q, delta or target changed


def _round_seed(seed: int, rnd: int) -> int:
    return int(np.random.SeedSequence([seed, rnd, 0xD9]).generate_state(1, np.uint64)[0] % (2**63))
