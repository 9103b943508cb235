"""Sample-level DP-SGD as a federated client's local training (``fl.local_privacy: dp_sgd:...``).

Client-level DP-FedAvg (``fl.privacy``) hides whether a client took part; this hides each of a
client's own examples, and the client does it itself, so what leaves it is private whoever
receives it, the server included:

1. Every local step draws a Poisson sample of the client's partition at rate
   q = ``data.batch_size`` / its examples (:func:`poisson_steps`); a round is
   ``round(local_epochs / q)`` such steps (at least one).
2. Each step is a DP-SGD step (:func:`shoal.privacy.dp_sgd.private_gradients`): per-example
   gradients clipped to ``clip``, Gaussian noise of std ``noise_multiplier * clip`` added by the
   client, the sum over the expected batch, then the local optimiser's step.
3. The client's :class:`~shoal.privacy.accountant.Ledger` counts its steps at its own q. A round
   whose steps would take its epsilon past ``target_epsilon`` is not trained: the client sits it
   out (a dropout to the server), and every round after.

The noise multiplier is given, not calibrated: how many rounds a client takes part in is not
known in advance, and each client's q differs with its partition's size.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from shoal.privacy.accountant import Ledger
from shoal.privacy.dp_sgd import DpSgdOptions, check_model, private_gradients


class LocalDpSgd:
    """One client process's local DP-SGD: the options, a noise source, and a ledger per partition."""

    def __init__(self, options: DpSgdOptions, batch_size: int, *, seed: int):
        if options.noise_multiplier is None:
            raise ValueError("fl.local_privacy: give noise_multiplier= (local DP-SGD is not calibrated)")
        self.options, self.batch_size = options, batch_size
        self.sigma = options.noise_multiplier
        self.reproducible = options.reproducible_noise
        self.generator = torch.Generator().manual_seed(
            seed * 7919 + 104729 if self.reproducible else secrets.randbits(63))
        self.ledgers: dict[int, Ledger] = {}
        self.round_steps: dict[int, int] = {}  # a client's local steps a round

    @classmethod
    def of(cls, cfg: Any) -> "LocalDpSgd | None":
        """The clients' local DP-SGD of a federated config (``fl.local_privacy``), or None."""
        if cfg.fl.local_privacy is None:
            return None
        return cls(cfg.fl.local_privacy.options, cfg.data.batch_size, seed=cfg.seed)

    def rate(self, examples: int) -> float:
        return min(1.0, self.batch_size / max(1, examples))

    def steps(self, examples: int, epochs: int) -> int:
        """Local steps in a round: ``epochs`` expected passes over the partition."""
        return max(1, round(epochs / self.rate(examples)))

    def ledger(self, client: int, examples: int) -> Ledger:
        if client not in self.ledgers:
            self.ledgers[client] = Ledger(noise_multiplier=self.sigma, sampling_rate=self.rate(examples),
                                          delta=self.options.delta, target_epsilon=self.options.target_epsilon)
        return self.ledgers[client]

    def allows(self, client: int, examples: int, epochs: int) -> bool:
        """Whether ``client`` may train a round: its steps fit what is left of its budget."""
        self.round_steps[client] = self.steps(examples, epochs)
        return not self.ledger(client, examples).would_exceed(self.round_steps[client])

    def train(self, client: int, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
              x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
              after_gradients: Callable[[], None] | None = None) -> list[float]:
        """One round of local DP-SGD on ``(x, y)``; records its steps in ``client``'s ledger.
        ``after_gradients``: run after each step's noised gradients, before the optimiser's step
        (FedProx's term, which depends on no example)."""
        check_model(model)
        ledger = self.ledger(client, len(y))
        steps, q = self.steps(len(y), epochs), self.rate(len(y))
        losses = []
        sampling = torch.Generator().manual_seed(seed) if self.reproducible else self.generator
        for batch in poisson_steps(len(y), q, steps, sampling):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = private_gradients(model, loss_fn, x[batch], y[batch], clip=self.options.clip,
                                        noise_std=self.sigma * self.options.clip, expected_batch=q * len(y),
                                        generator=self.generator)
            if after_gradients is not None:
                after_gradients()
            optimizer.step()
            if len(batch):
                losses.append(loss.item())
        ledger.record(steps)
        return losses

    def save(self, path: Path, client: int) -> None:
        """Write ``client``'s ledger to ``path`` atomically (temp file, then rename)."""
        from shoal.metrics.summary import write_json_atomic

        write_json_atomic(path, {"partition": client, "ledger": self.ledgers[client].state_dict()})

    def load(self, path: Path, client: int, examples: int) -> None:
        """Go on from the ledger a previous process of ``client`` saved at ``path`` (nothing there: a new
        one). ValueError for another partition's file or a ledger of other settings: spent budget is
        never merged into, nor replaced by, another."""
        import json

        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--privacy-state {path}: unreadable ({err})") from None
        owner = saved.get("partition") if isinstance(saved, dict) else None
        if owner != client:
            raise ValueError(f"--privacy-state {path}: holds partition {owner}'s ledger, not partition {client}'s")
        try:
            self.ledger(client, examples).load_state_dict(saved.get("ledger"))
        except ValueError as err:
            raise ValueError(f"--privacy-state {path}: {err}") from None

    def report(self) -> dict:
        """summary.json's ``local_privacy``: the mechanism and the clients' spend (max and median epsilon)."""
        spent = sorted(ledger.spent() for ledger in self.ledgers.values())
        exhausted = sum(1 for client, ledger in self.ledgers.items()
                        if ledger.would_exceed(self.round_steps.get(client, 1)))
        return {"mechanism": "dp_sgd", "where": "client (local training)", "sampler": "poisson",
                "noise_multiplier": self.sigma, "clip": self.options.clip, "delta": self.options.delta,
                "accountant": "pld", "target_epsilon": self.options.target_epsilon, "clients": len(spent),
                "max_epsilon": spent[-1] if spent else 0.0,
                "median_epsilon": spent[len(spent) // 2] if spent else 0.0,
                "clients_out_of_budget": exhausted}  # another round would pass target_epsilon


def poisson_steps(examples: int, rate: float, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index tensors, each example in each with probability ``rate`` independently."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(examples, generator=generator) < rate).flatten()

