"""How a strategy turns a batch into gradients and an update: precision,
gradient accumulation and gradient-norm clipping (``train.precision``,
``train.accumulate``, ``train.clip_grad_norm``).

- **Precision**: ``bf16`` runs the forward pass and the loss under
  ``torch.autocast`` in bfloat16, on CPU and GPU; parameters, gradients and
  the optimizer stay fp32. ``fp16`` is autocast in float16 with a gradient
  scaler, and needs CUDA.
- **Accumulation**: the step's batch is split into ``accumulate``
  micro-batches, and each one's backward adds to the gradients. Under DDP
  only the last one communicates (the others run in ``no_sync``), so the
  codec sees one gradient a step, as without accumulation. The step's
  gradient is the mean over the whole batch, as without accumulation too:
  this trades memory for time and leaves the maths alone.
- **Clipping**: the gradient's global L2 norm is clipped to
  ``clip_grad_norm`` before the optimizer step. Under DDP that is after the
  all-reduce, on the gradient every worker applies. Under the parameter
  servers it is each worker's gradient, before its push.

A strategy says which of these it honours (``Strategy.recipe_support``);
:func:`shoal.config.check_recipe` refuses the rest before any worker starts.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepRecipe:
    """The precision, accumulation and clipping of one worker's steps."""

    def __init__(self, precision: str = "fp32", accumulate: int = 1, clip_grad_norm: float | None = None,
                 device: torch.device | None = None):
        self.precision, self.accumulate, self.clip_grad_norm = precision, accumulate, clip_grad_norm
        self.device = device or torch.device("cpu")
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.last_norm: float | None = None  # the gradient norm before clipping, at the last step

    @classmethod
    def from_config(cls, train: Any, device: torch.device) -> "StepRecipe":
        return cls(train.precision, train.accumulate, train.clip_grad_norm, device)

    def autocast(self) -> ContextManager[Any]:
        if self.precision not in DTYPES:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def gradients(self, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                  targets: torch.Tensor, *, quiet: Callable[[], ContextManager[Any]] | None = None,
                  weight: float = 1.0) -> torch.Tensor:
        """Forward and backward of the batch in micro-batches; returns the batch's mean loss (detached).

        ``loss_of(inputs, targets)``: the micro-batch's mean loss. ``quiet``: a
        context in which backward does not communicate (DDP's ``no_sync``), for
        every micro-batch but the last. ``weight`` scales the gradient (unequal shares)."""
        parts = max(1, min(self.accumulate, len(targets)))
        if parts == 1 and self.precision == "fp32":  # the plain step, with nothing added to it
            loss = loss_of(inputs, targets)
            (loss * weight if weight != 1.0 else loss).backward()
            return loss.detach()
        total = torch.zeros((), device=self.device)
        chunks = list(zip(inputs.tensor_split(parts), targets.tensor_split(parts)))
        for i, (x, y) in enumerate(chunks):
            with quiet() if quiet is not None and i < len(chunks) - 1 else nullcontext():
                with self.autocast():
                    loss = loss_of(x, y)
                share = loss.float() * (len(y) / len(targets) * weight)
                (self.scaler.scale(share) if self.scaler is not None else share).backward()
            total += loss.detach().float() * len(y)
        return total / len(targets)

    def clip(self, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Unscale (fp16) and clip the gradients in place, when asked to."""
        if self.scaler is not None and optimizer is not None:
            self.scaler.unscale_(optimizer)
        if self.clip_grad_norm is not None:
            self.last_norm = float(torch.nn.utils.clip_grad_norm_(list(params), self.clip_grad_norm))

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
        """Clip, then the optimizer step (through the scaler under fp16: it skips a step with inf gradients)."""
        self.clip(params, optimizer)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

