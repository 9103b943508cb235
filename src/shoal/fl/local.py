"""A client's local work: train on its own data from the global weights, and
encode the change for the uplink.

The same code runs in a ``shoal fl client`` process and, one client after
another, inside ``shoal fl simulate``. Weights are handled as one flat
float32 vector (parameters and floating buffers in ``state_dict`` order,
:class:`FlatWeights`). Each round starts a fresh local optimiser (as clients
keep no optimiser state between rounds). FedProx's proximal term
mu/2 * ||w - w_global||^2 is applied here, as its gradient mu * (w - w_global)
added after every backward pass, so a user's model and loss need no change.
FedSGD's single full-batch step is also taken here (``full_batch_step``).
Under DP-FedAvg with client-side clipping the round config holds
``clip_norm``, and what is encoded is clipped to it before it leaves. Under
``fl.local_privacy`` the local steps are DP-SGD steps
(:mod:`shoal.fl.privacy.local_dp`).
The loss is the run's task's (``loss_fn``, cross-entropy by default).

The uplink carries ``encode(delta + residual)`` for the configured codec; the
residual (error feedback, ``memory=ef``) is the client's own, kept between
the rounds it takes part in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from shoal.comm import layout
from shoal.comm.codecs.base import Codec, Payload
from shoal.comm.memory import ErrorFeedback
from shoal.config import OptimizerConfig
from shoal.engine.optim import build_optimizer
from shoal.privacy.clipping import clip


class FlatWeights:
    """A model's floating state as one flat vector, and back."""

    def __init__(self, model: nn.Module):
        self.tensors = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.numel = sum(t.numel() for t in self.tensors)

    @torch.no_grad()
    def get(self) -> torch.Tensor:
        return layout.flatten(self.tensors, dtype=torch.float32).cpu()

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        if vector.numel() != self.numel:
            raise ValueError(f"weights have {vector.numel()} values; the model has {self.numel}")
        layout.copy_into(self.tensors, vector)


@dataclass
class LocalResult:
    payload: Payload  # what travels
    delta: torch.Tensor  # what the server will decode from it
    num_examples: int
    loss: float
    compute_s: float


class LocalTrainer:
    """Local training for any client: one model object, reloaded every round."""

    def __init__(self, model: nn.Module, optimizer: OptimizerConfig, batch_size: int, codec: Codec, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 privacy: Any = None):
        self.model = model
        self.privacy = privacy  # shoal.fl.privacy.local_dp.LocalDpSgd under fl.local_privacy
        self.loss_fn = loss_fn
        self.flat = FlatWeights(model)
        self.optimizer_cfg = optimizer
        self.batch_size = batch_size
        self.codec = codec

    def fit(self, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
            config: dict[str, Any], seed: int, memory: ErrorFeedback | None = None, client: int = 0,
            codec: Codec | None = None) -> LocalResult:
        """Train from ``weights`` and encode the change; ``client`` names whose privacy ledger a
        local DP-SGD round counts in; ``codec`` encodes instead of the trainer's own (a simulated
        client's, with its own random stream)."""
        started = time.perf_counter()
        self.flat.set(weights)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        mu = float(config.get("mu", 0.0))
        anchor = [p.detach().clone() for p in params] if mu > 0 else None
        if config.get("full_batch_step"):
            losses = [self._full_batch_step(params, x, y)]
        elif self.privacy is not None:
            losses = self.privacy.train(client, self.model, self.loss_fn, build_optimizer(self.optimizer_cfg, params),
                                        x, y, epochs, seed, after_gradients=_proximal(params, mu, anchor))
        else:
            losses = self._epochs(params, x, y, epochs, seed, mu, anchor)
        delta = self.flat.get() - weights
        compensated = memory.compensate(0, delta) if memory is not None else delta
        if config.get("clip_norm") is not None:
            # Clip what is encoded (delta plus any residual), so the payload itself is bounded;
            # the clipped-off part is dropped, as in DP-FedAvg: the residual keeps codec error only.
            compensated, _ = clip(compensated, float(config["clip_norm"]))
        codec = self.codec if codec is None else codec
        payload = codec.encode(compensated)
        decoded = codec.decode(payload).reshape(-1).float()
        if memory is not None:
            memory.update(0, compensated, decoded)
        return LocalResult(payload, decoded, len(y), sum(losses) / max(len(losses), 1),
                           time.perf_counter() - started)

    def _epochs(self, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                mu: float, anchor: list[torch.Tensor] | None) -> list[float]:
        optimizer = build_optimizer(self.optimizer_cfg, params)
        generator = torch.Generator().manual_seed(seed)
        proximal = _proximal(params, mu, anchor)
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x[batch]), y[batch])
                loss.backward()
                if proximal is not None:
                    proximal()
                optimizer.step()
                losses.append(loss.item())
        return losses

    def _full_batch_step(self, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> float:
        for p in params:
            p.grad = None
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=self.optimizer_cfg.lr)
        return loss.item()


def local_privacy(cfg: Any) -> Any:
    """The clients' local DP-SGD (``fl.local_privacy``,
    :class:`shoal.fl.privacy.local_dp.LocalDpSgd`), or None; dp-accounting is imported only for it."""
    if cfg.fl.local_privacy is None:
        return None
    from shoal.fl.privacy.local_dp import LocalDpSgd

    return LocalDpSgd.of(cfg)


def _proximal(params: list[nn.Parameter], mu: float, anchor: list[torch.Tensor] | None) -> Callable[[], None] | None:
    """FedProx's gradient term mu * (w - w_global), added to the gradients (None without it)."""
    if anchor is None:
        return None

    @torch.no_grad()
    def add() -> None:
        for p, p0 in zip(params, anchor):
            if p.grad is not None:
                p.grad.add_(p - p0, alpha=mu)
    return add


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The shuffling seed of one client in one round: reproducible, distinct."""
    return (seed * 1_000_003 + rnd * 7_919 + client) % (2**63)
