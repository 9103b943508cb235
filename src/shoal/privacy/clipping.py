"""L2 clipping of one client's update, and a clip norm that adapts to a quantile of the update norms.

Pure maths on tensors, no federation: :func:`clip` is the per-client step of
DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"); :class:`AdaptiveClip` is the geometric quantile update of
Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS), and :func:`delta_noise_multiplier` its split of the noise budget
between the updates and the clipped count.
"""

from __future__ import annotations

import math

import torch


def clip(delta: torch.Tensor, norm: float) -> tuple[torch.Tensor, bool]:
    """``(clipped, was_within)``: ``delta`` scaled to L2 norm at most ``norm``, and whether it already was."""
    if norm <= 0:
        raise ValueError(f"norm: {norm} must be > 0")
    length = float(delta.norm())
    if length <= norm:
        return delta, True
    return delta * (norm / length), False


def delta_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """The updates' noise multiplier z_delta when the clipped count takes part of the budget.

    Andrew et al. 2021, Theorem 1: one round of adaptive clipping with noise
    std z_delta * C on the sum of clipped updates and ``count_noise`` (sigma_b)
    on the sum of the indicators b_i is as private as non-adaptive DP-FedAvg
    with noise multiplier z when z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    (The count enters as sum(b_i - 1/2), sensitivity 1/2, hence the 2.)
    Needs 2 sigma_b > z; a smaller sigma_b leaves no budget for the updates.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier: {noise_multiplier} must be > 0")
    if 2 * count_noise <= noise_multiplier:
        raise ValueError(f"count_noise: {count_noise:g} is too small for noise_multiplier={noise_multiplier:g}: "
                         f"adaptive clipping needs count_noise > noise_multiplier / 2 = {noise_multiplier / 2:g} "
                         "(Andrew et al. 2021 suggest clients_per_round / 20; sample more clients per round, "
                         "raise count_noise or lower noise_multiplier)")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


class AdaptiveClip:
    """A clip norm that tracks a quantile of the clients' update norms (Andrew et al. 2021, Algorithm 1).

    Each round, with m the expected number of participants:

    1. every update is clipped to the current C; b_i = 1 if ||delta_i|| <= C, else 0;
    2. the noised fraction within the bound is b = (sum b_i + N(0, sigma_b^2)) / m;
    3. after the round, C <- C * exp(-eta * (b - target_quantile)).

    Too many updates within C (b > target) shrink C, too few grow it; the
    geometric step makes the rate independent of the norms' scale. The C of a
    round is the one its updates were clipped to and its noise scaled by:
    :meth:`update` is called once the round is aggregated.
    """

    def __init__(self, *, initial_norm: float, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise: float, expected_clients: int):
        if initial_norm <= 0:
            raise ValueError(f"initial_norm: {initial_norm} must be > 0")
        if not 0 < target_quantile < 1:
            raise ValueError(f"target_quantile: {target_quantile} must be in (0, 1)")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate: {learning_rate} must be > 0")
        if count_noise < 0:
            raise ValueError(f"count_noise: {count_noise} must be >= 0")
        if expected_clients < 1:
            raise ValueError(f"expected_clients: {expected_clients} must be >= 1")
        self.norm = float(initial_norm)
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_noise = count_noise
        self.expected_clients = expected_clients

    def update(self, within: int, generator: torch.Generator) -> float:
        """Move C after a round in which ``within`` updates were inside it; returns the noised fraction b."""
        noise = float(torch.randn((), generator=generator)) * self.count_noise
        fraction = (within + noise) / self.expected_clients
        self.norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return fraction

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"clip_norm": torch.tensor(self.norm, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.norm = float(state["clip_norm"])
