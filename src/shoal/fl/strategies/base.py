"""The server strategy interface: which clients, what they run, how results combine.

A round is: :meth:`FedStrategy.sample` picks clients from those available,
each runs :meth:`FedStrategy.client_config` locally and returns a
:class:`ClientResult`, and :meth:`FedStrategy.aggregate` turns the results
into the next global weights. Weights travel as one flat float32 vector
(parameters and floating buffers in ``state_dict`` order); a client returns
its change to them (``delta``), already decoded from whatever codec carried
it. Privacy mechanisms wrap a strategy (they see the same three calls); they
never subclass one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel


@dataclass
class ClientResult:
    client: str
    delta: torch.Tensor  # client weights - global weights, flat float32
    num_examples: int
    loss: float  # mean local training loss


class FedStrategy:
    """Base: uniform sampling without replacement, no client options, no server state."""

    # Whether aggregate() applies its server step to a mean of the updates: a privacy wrapper
    # (DP-FedAvg) then hands it one noised mean. The robust rules (median, trimmed mean) say False.
    aggregates_mean = True

    def __init__(self, options: BaseModel):
        self.options = options

    def sample(self, rnd: int, available: list[str], count: int, rng: np.random.Generator) -> list[str]:
        """``count`` clients (or all, if fewer are available) drawn uniformly from ``rng``."""
        if len(available) <= count:
            return list(available)
        return [available[i] for i in sorted(rng.choice(len(available), size=count, replace=False))]

    def client_config(self, rnd: int) -> dict[str, Any]:
        """Options for every selected client's local run (e.g. FedProx's ``mu``)."""
        return {}

    def aggregate(self, rnd: int, weights: torch.Tensor, results: list[ClientResult]) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side state that must survive a restart (optimiser moments)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def weighted_mean(results: list[ClientResult]) -> torch.Tensor:
    """The sample-weighted mean of the clients' deltas (FedAvg's update)."""
    total = sum(r.num_examples for r in results)
    mean = torch.zeros_like(results[0].delta)
    for r in results:
        mean.add_(r.delta, alpha=r.num_examples / total)
    return mean


def build_fed_strategy(component: Any) -> FedStrategy:
    return component.target(component.options)
