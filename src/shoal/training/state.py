"""What a run carries across a restart: the counters of :class:`RunState`, and
the checkpoint that saves them with the model, optimizer, schedule and every
worker's random stream and strategy state, and restores them."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from shoal.strategies.base import StepStats
from shoal.engine.checkpoint import load_checkpoint, save_checkpoint
from shoal.training.build import Run

CHECKPOINT = "checkpoint.pt"


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
        self.best_accuracy = 0.0
        self.time_to_target: float | None = None
        self.steps_to_target: int | None = None
        self.resumed_from: int | None = None
        self.sparsity = 0.0  # of the masks in force (prune:)

    def add(self, stats: StepStats, *, step_s: float, wall: float) -> None:
        self.step += 1
        self.clock += step_s
        self.wall = wall
        self.samples += stats.samples
        self.wire_bytes += stats.wire_bytes
        self.dense_bytes += stats.dense_bytes
        self.comm_s += stats.comm_s

    def record_eval(self, acc: float, loss: float, target: float | None) -> None:
        self.best_accuracy = max(self.best_accuracy, acc)
        if target is not None and self.time_to_target is None and acc >= target:
            self.time_to_target = self.clock
            self.steps_to_target = self.step

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
