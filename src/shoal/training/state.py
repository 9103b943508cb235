"""What a run carries across a restart: the counters of :class:`RunState`, and
the checkpoint that saves them with the model, optimizer, schedule and every
worker's random stream and strategy state, and restores them; and the
keep-best checkpoint, ``best.pt``."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from shoal.config import EarlyStoppingConfig
from shoal.strategies.base import StepStats
from shoal.engine.checkpoint import load_checkpoint, save_checkpoint
from shoal.tasks.base import improves, reaches
from shoal.training.build import Run

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class RunState:
    """Counters that a checkpoint carries so a resumed run continues exactly."""

    def __init__(self) -> None:
        self.step = 0
        self.clock = 0.0  # training seconds, evaluation and checkpointing excluded
        self.wall = 0.0  # wall seconds of the training loop so far, all sessions
        self.wall_before = 0.0  # of earlier sessions, when resumed
        self.samples = 0
        self.wire_bytes = 0
        self.dense_bytes = 0
        self.comm_s = 0.0
        self.time_to_target: float | None = None
        self.steps_to_target: int | None = None
        self.resumed_from: int | None = None
        self.sparsity = 0.0  # of the masks in force (prune:)
        # The task's main metric: its best evaluation so far, and early stopping's patience.
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.patience_best: float | None = None  # where the last improvement of at least min_delta reached
        self.evals_without_improvement = 0
        self.stopped_early_at: int | None = None

    def add(self, stats: StepStats, *, step_s: float, wall: float) -> None:
        self.step += 1
        self.clock += step_s
        self.wall = wall
        self.samples += stats.samples
        self.wire_bytes += stats.wire_bytes
        self.dense_bytes += stats.dense_bytes
        self.comm_s += stats.comm_s

    def record_eval(self, value: float, *, higher_is_better: bool, target: float | None = None,
                    early_stopping: EarlyStoppingConfig | None = None) -> bool:
        """Count an evaluation whose main metric is ``value``: the best so far,
        the time to target, and early stopping's patience. Returns whether it is
        a new best (keep-best writes it)."""
        new_best = improves(value, self.best_metric, higher_is_better=higher_is_better)
        if new_best:
            self.best_metric, self.best_step = value, self.step
        if target is not None and self.time_to_target is None and reaches(value, target,
                                                                          higher_is_better=higher_is_better):
            self.time_to_target = self.clock
            self.steps_to_target = self.step
        if early_stopping is not None:
            # Measured from the last improvement of at least min_delta, so that many
            # small gains in a row do not keep a stalled run going (Keras' EarlyStopping).
            if improves(value, self.patience_best, higher_is_better=higher_is_better,
                        min_delta=early_stopping.min_delta):
                self.patience_best, self.evals_without_improvement = value, 0
            else:
                self.evals_without_improvement += 1
        return new_best

    def patience_spent(self, early_stopping: EarlyStoppingConfig | None) -> bool:
        """Whether early stopping's patience has run out."""
        return early_stopping is not None and self.evals_without_improvement >= early_stopping.patience

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, saved: dict[str, Any]) -> None:
        vars(self).update(saved)


def checkpoint_run(run: Run, state: RunState) -> None:
    """Every rank hands in its part; rank 0 writes the run's ``checkpoint.pt``."""
    # Random streams and strategy state (error-feedback residuals, codec
    # generators) differ per worker: keep every worker's.
    run.strategy.prepare_eval()
    mine = {"rng": torch.get_rng_state(), "strategy": run.strategy.state_dict()}
    workers = run.group.all_gather_object(mine)
    if not run.is_main:
        return
    save_checkpoint(
        run.out / CHECKPOINT,
        {
            "run": state.state_dict(),
            "model": run.strategy.eval_model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "workers": workers,
        },
    )


def save_best(run: Run, state: RunState, metrics: dict[str, float]) -> None:
    """Rank 0, after an evaluation that improved the main metric: ``best.pt``,
    written atomically, with the evaluated weights, the step and the metrics
    (``train.init_from`` reads its weights like a checkpoint's)."""
    task = run.task
    save_checkpoint(run.out / BEST, {
        "model": run.strategy.eval_model.state_dict(),
        "step": state.step,
        "task": run.cfg.task.spec(),
        "metric": task.main_metric,
        "value": metrics[task.main_metric],
        "metrics": dict(metrics),
    })


def restore_run(run: Run) -> RunState:
    """Rank 0 reads the checkpoint and sends it to the others (no shared disk needed)."""
    ctx = run.ctx
    saved = run.group.broadcast_object(load_checkpoint(run.out / CHECKPOINT) if ctx.rank == 0 else None)
    run.strategy.eval_model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    workers = saved["workers"]
    if len(workers) == ctx.world_size:
        torch.set_rng_state(workers[ctx.rank]["rng"])
        run.strategy.load_state_dict(workers[ctx.rank]["strategy"])
    elif ctx.rank == 0:
        # Residuals and random streams belong to workers that no longer exist.
        warnings.warn(
            f"resuming {len(workers)}-worker state on {ctx.world_size} workers: "
            "per-worker strategy state (error-feedback residuals, codec streams) starts fresh"
        )
    state = RunState()
    state.load(saved["run"])
    state.wall_before = state.wall
    state.resumed_from = state.step
    return state
