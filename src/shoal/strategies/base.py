"""The strategy interface every way of training on many workers implements.

A strategy owns how one optimisation step is taken across workers: it wraps
the model, the optimizer and the process group, and reports what the step
cost. The training loop only ever calls :meth:`Strategy.step`, so a new
strategy plugs in by registering a name, without touching the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from shoal.engine.recipe import StepRecipe
from shoal.registry import Component


@dataclass(frozen=True)
class WorkerContext:
    """Where this process sits in the job; no live handles, only facts."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


@dataclass
class StepStats:
    loss: float
    compute_s: float
    comm_s: float
    wire_bytes: int
    dense_bytes: int
    samples: int
    staleness: float | None = None  # parameter-server strategies: versions between pull and apply


class Strategy(ABC):
    """``step(inputs, targets) -> StepStats`` plus checkpointable state."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        options: Any,
        codec: Component,
        context: WorkerContext,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        group: dist.ProcessGroup | None = None,
        recipe: StepRecipe | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.options = options
        self.codec_spec = codec
        self.context = context
        self.loss_fn = loss_fn
        self.group = group
        self.recipe = recipe or StepRecipe(device=context.device)  # precision, accumulation, clipping

    @abstractmethod
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        """One optimisation step on this worker's batch."""

    collective_eval = True  # every rank evaluates its share; False: rank 0 alone, nobody waits
    # Which of train.precision / accumulate / clip_grad_norm step() honours (shoal.engine.recipe):
    # none unless a strategy says so, and the config check refuses the others.
    recipe_support: frozenset[str] = frozenset()

    @classmethod
    def topology(cls, options: Any) -> str | None:
        """The registered topology (``shoal.registry.TOPOLOGIES``) that runs this
        strategy with these options, or None for this class itself
        (``sync:backup=b`` runs on the parameter server's ``backup``)."""
        return None

    def finished(self) -> bool:
        """True when the job was told to stop (parameter servers' stop at target)."""
        return False

    def stop_margin(self) -> int:
        """How many steps apart two workers can be at a step boundary: a stop
        after a signal is agreed this far ahead (see shoal.engine.stop)."""
        return 2

    def request_stop(self) -> None:
        """Rank 0 reached the target: tell the other workers (strategies without collective eval)."""

    def close(self) -> dict[str, float]:
        """After the last step, on every rank: release what the strategy holds; extra summary fields."""
        return {}

    def data_shard(self) -> tuple[int, int]:
        """(which share of the training data this rank reads, how many shares):
        one per worker, unless several ranks work on the same batch (pipeline stages)."""
        return self.context.rank, self.context.world_size

    def prepare_eval(self) -> None:
        """Before an evaluation or a checkpoint, on every rank that takes part:
        make :attr:`eval_model` the whole, current model."""

    def progress(self, counters: dict[str, Any]) -> None:
        """After every step: the run's counters so far (a supervised worker hands
        them to its supervisor, to rejoin from if it dies)."""

    def rejoin(self, steps_done: int) -> None:
        """This worker was restarted while the others trained on: catch up with them."""
        raise NotImplementedError(f"{type(self).__name__} cannot rejoin a running job")

    def kill_server(self) -> None:
        """The injected fault ``fault.target=server``: kill the process serving this rank's shard."""
        raise NotImplementedError(f"{type(self).__name__} has no parameter server")

    # --- sparse training (shoal.engine.sparsity): what the masks ask of a strategy ---
    def use_masks(self, masks: Any) -> None:
        """Sparse training: ``masks`` says which weights are pruned (read its
        ``version``, ``flat_mask(params)`` and ``mask_of(param)``); a strategy
        may skip sending their gradients."""

    def holds_masks(self) -> bool:
        """Whether this worker ranks and enforces the masks itself (False: another
        process holds the model and enforces them, e.g. a parameter server)."""
        return True

    def before_ranking(self) -> None:
        """Make every weight this worker ranks current (a pipeline rank holds only its stages)."""

    def masks_changed(self, masks: Any) -> None:
        """New masks are in force here: pass them on to wherever else they are enforced."""

    def split_batch(self, batch_size: int) -> Callable[[], list[int]] | None:
        """Every worker's share of the next global batch, or None for equal shares."""
        return None

    @property
    def eval_model(self) -> nn.Module:
        """The plain module to evaluate and checkpoint (no wrappers)."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
