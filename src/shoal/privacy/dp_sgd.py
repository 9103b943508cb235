"""Sample-level differential privacy for ``shoal train``: DP-SGD (Abadi et al. 2016).

Every step, on every worker:

1. Per-example gradients of the worker's Poisson-sampled batch, from
   ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``): PyTorch's
   own per-sample gradients, no hand-written rule per layer.
2. Each example's whole gradient is clipped to L2 norm ``clip`` and the
   clipped gradients are summed.
3. Rank 0 alone adds Gaussian noise of standard deviation
   ``noise_multiplier * clip`` to its sum: one global step's noise, added
   once, not once per worker (the sum of W workers' noise would be sqrt(W)
   times too much).
4. Every worker divides by the *expected* global batch, ``q * N`` (``q``
   the sampling rate, ``N`` the training set), not by the batch it drew: the
   drawn size depends on the data and would leak it. The strategy then
   all-reduces the sums and every worker applies the same update.

The batches come from :class:`shoal.data.poisson.PoissonBatches`: each
training example takes part in a step with probability ``q`` independently,
which is what the accountant (:mod:`shoal.privacy.accountant`) assumes.

Threat model: the model (every checkpoint, every update) may be published;
the workers of one job trust one another (rank 0 knows the noise it drew).
BatchNorm mixes examples within a batch, so a per-example gradient does not
exist: such a model is refused, naming the layer (use GroupNorm).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from shoal.privacy.accountant import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, Ledger, calibrate, epsilon
from shoal.registry import PRIVACY

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DpSgdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    noise_multiplier: Optional[float] = Field(None, ge=MIN_NOISE_MULTIPLIER, le=MAX_NOISE_MULTIPLIER,
                                              description="noise std as a multiple of clip (none: calibrated "
                                              "to target_epsilon)")
    clip: float = Field(1.0, gt=0, le=1e6, description="L2 clip norm of one example's gradient")
    target_epsilon: Optional[float] = Field(None, gt=0, le=100, description="the budget, a hard limit: no step "
                                            "starts that would spend more")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) guarantee")
    reproducible_noise: bool = Field(False, description="noise and sampling from the run's seed (tests); "
                                     "default: the operating system's entropy")

    @model_validator(mode="after")
    def _noise_or_budget(self) -> "DpSgdOptions":
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy: dp_sgd needs noise_multiplier= or target_epsilon= (to calibrate the noise to)")
        return self


@PRIVACY.register("dp_sgd", DpSgdOptions)
class DpSgd:
    """Sample-level DP-SGD: per-example clipping, one global step's Gaussian noise, Poisson sampling."""

    def __init__(self, options: DpSgdOptions, *, plan: "Plan", rank: int, seed: int):
        self.options, self.plan, self.rank = options, plan, rank
        self.clip = options.clip
        self.noise_std = plan.noise_multiplier * options.clip
        self.ledger = Ledger(noise_multiplier=plan.noise_multiplier, sampling_rate=plan.sampling_rate,
                             delta=options.delta, target_epsilon=options.target_epsilon)
        # Nobody who knows the config can subtract the noise, unless it is asked to be reproducible.
        self.generator = torch.Generator().manual_seed(
            seed * 7919 + 104729 if options.reproducible_noise else secrets.randbits(63))
        self.clipped_fraction = 0.0  # of the last step's examples (not noised: a diagnostic, kept on this machine)
        self.stopped_by_budget = False  # the training loop stopped before a step past target_epsilon

    def gradients(self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *,
                  chunks: int = 1) -> torch.Tensor:
        """Set every parameter's ``.grad`` to this worker's share of the noised mean: its clipped sum
        (rank 0: plus the noise) over the expected global batch; returns the batch's mean loss.
        ``chunks``: the batch's per-example gradients in this many parts (memory)."""
        loss, clipped = private_gradients(model, loss_fn, inputs, targets, clip=self.clip,
                                          noise_std=self.noise_std if self.rank == 0 else 0.0,
                                          expected_batch=self.plan.expected_batch, generator=self.generator,
                                          chunks=chunks)
        self.clipped_fraction = clipped / max(1, len(targets))
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("ledger") is not None:
            self.ledger.load_state_dict(state["ledger"])

    def report(self) -> dict[str, Any]:
        """summary.json's ``privacy``: the guarantee, the mechanism and how batches were sampled."""
        return {**self.ledger.report(), "mechanism": "dp_sgd", "clip": self.clip,
                "planned_steps": self.plan.steps, "planned_epsilon": self.plan.epsilon, "sampler": "poisson",
                "expected_batch": self.plan.expected_batch, "noise_added_by": "rank 0, once per global step",
                "stopped_by_budget": self.stopped_by_budget}


def private_gradients(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *,
                      clip: float, noise_std: float, expected_batch: float, generator: torch.Generator,
                      chunks: int = 1) -> tuple[torch.Tensor, int]:
    """Set every parameter's ``.grad`` to (the sum of the batch's per-example gradients, each clipped
    to ``clip``, plus Gaussian noise of std ``noise_std``) / ``expected_batch``; return the batch's mean
    loss and how many examples were clipped. ``chunks``: per-example gradients in this many parts."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    losses, clipped = [], 0
    for x, y in zip(inputs.tensor_split(max(1, chunks)), targets.tensor_split(max(1, chunks))):
        if len(y) == 0:
            continue
        grads, loss = per_example_gradients(model, loss_fn, x, y)
        sums, norms = clip_and_sum(grads, clip)
        for name in total:
            total[name] += sums[name]
        losses.append(loss)
        clipped += int((norms > clip).sum())
    if noise_std > 0:
        for t in total.values():
            t += torch.randn(t.shape, generator=generator).to(t.device, t.dtype) * noise_std
    for name, p in params.items():
        p.grad = total[name] / expected_batch
    return (torch.cat(losses).mean() if losses else torch.zeros(())), clipped


def per_example_gradients(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor,
                          targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({name: gradient of each example, shape [B, *param]}, the B losses)`` by ``torch.func``."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))
        return loss, loss.detach()

    grads, losses = vmap(grad(loss_of_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
        params, inputs, targets)
    return grads, losses


def clip_and_sum(grads: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient (over all parameters) scaled to L2 norm <= ``clip``, summed over the batch;
    and the examples' norms before clipping."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("b,b...->...", scale.to(g.dtype), g) for name, g in grads.items()}, norms


def check_model(model: nn.Module, spec: str = "the model") -> None:
    """ValueError naming the first BatchNorm layer: DP-SGD needs per-example gradients, which it mixes."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"privacy: dp_sgd cannot train {spec}: its layer {name!r} is {type(module).__name__}, "
                             "which mixes the examples of a batch, so no per-example gradient exists; use a model "
                             "with GroupNorm (or LayerNorm) instead")


@dataclass(frozen=True)
class Plan:
    """What a DP-SGD run will spend: its mechanism, its length and the epsilon at the end."""

    noise_multiplier: float
    calibrated: bool  # calibrated to target_epsilon, not given
    sampling_rate: float
    expected_batch: float  # q x the training examples the workers read
    steps: int
    epsilon: float  # PLD, after ``steps``
    delta: float
    target_epsilon: float | None

    def line(self, clip: float) -> str:
        """The header line ``shoal train`` prints."""
        noise = f"noise {self.noise_multiplier:.4g}" + (" (calibrated)" if self.calibrated else "")
        budget = f" of target {self.target_epsilon:g}" if self.target_epsilon is not None else ""
        return (f"privacy: DP-SGD, clip {clip:g}, {noise}, Poisson sampling q={self.sampling_rate:.4g} "
                f"(expected batch {self.expected_batch:.4g}): {self.steps} steps spend epsilon "
                f"{self.epsilon:.3g}{budget} at delta {self.delta:g} (PLD)")


def sampling(train_size: int, world_size: int, batch_size: int) -> tuple[float, int, int]:
    """``(q, examples read, steps a pass)``: every worker reads its ``train_size // world_size`` examples and
    takes each into a step with probability q = batch_size / that; a pass is 1 / q steps."""
    shard = train_size // world_size
    if batch_size > shard:
        raise ValueError(f"data.batch_size: {batch_size} expected examples a step exceed the {shard} each of "
                         f"{world_size} workers holds ({train_size} training examples)")
    return batch_size / shard, shard * world_size, max(1, round(shard / batch_size))


def plan(options: DpSgdOptions, *, sampling_rate: float, examples: int, steps: int) -> Plan:
    """The run's noise (given, or calibrated to target_epsilon) and the epsilon its steps spend;
    ValueError naming the epsilon when they do not fit target_epsilon."""
    calibrated = options.noise_multiplier is None
    if calibrated:
        try:
            sigma = calibrate(options.target_epsilon, options.delta, sampling_rate, steps)
        except ValueError as err:
            raise ValueError(f"privacy.target_epsilon: {err}") from None
    else:
        sigma = options.noise_multiplier
    spent = epsilon(sigma, sampling_rate, steps, options.delta)
    if options.target_epsilon is not None and spent > options.target_epsilon * (1 + 1e-9):
        raise ValueError(f"privacy.target_epsilon: {steps} steps at noise_multiplier {sigma:g} (Poisson sampling "
                         f"q={sampling_rate:.4g}) would spend epsilon {spent:.3g} > {options.target_epsilon:g} at "
                         f"delta {options.delta:g}: raise the noise, cut the steps or give target_epsilon alone "
                         "(the noise is then calibrated)")
    return Plan(noise_multiplier=sigma, calibrated=calibrated, sampling_rate=sampling_rate,
                expected_batch=sampling_rate * examples, steps=steps, epsilon=spent, delta=options.delta,
                target_epsilon=options.target_epsilon)


def run_steps(train: Any, steps_per_pass: int) -> int:
    """The run's length in steps, as the training loop counts it (``train.steps``, or epochs of passes)."""
    return train.steps if train.steps is not None else max(1, math.ceil(train.epochs * steps_per_pass))
