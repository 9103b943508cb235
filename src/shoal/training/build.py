"""Phase 1 of the training loop: what one worker's run is built from the config.

:func:`build_run` makes the data, task, model, optimizer, strategy, batches, learning-rate
schedule and sparse masks; :class:`Run` holds them, fixed once built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.config import RunConfig
from shoal.data import DatasetBundle, ShardedBatches, build_dataset
from shoal.models import build_model
from shoal.metrics.writer import preload_tensorboard
from shoal.netem.slowdown import Slowdown
from shoal.strategies.base import Strategy, WorkerContext
from shoal.engine.checkpoint import load_weights
from shoal.engine.group import Group
from shoal.engine.recipe import StepRecipe
from shoal.engine.optim import build_optimizer, build_scheduler
from shoal.engine.sparsity import SparsityController
from shoal.tasks.base import Task, build_task


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The run's length: ``train.steps``, else ``train.epochs`` of steps rounded up (at least one)."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


@dataclass(frozen=True)
class Run:
    """One worker's run: what it was started with, and what :func:`build_run` made
    from the config. Fixed once built; what changes as it trains is
    :class:`~shoal.training.state.RunState`."""

    cfg: RunConfig
    ctx: WorkerContext
    group: Group
    out: Path
    slowdown: Slowdown | None
    attempt: int
    rejoin: dict[str, Any] | None
    data: DatasetBundle
    task: Task
    optimizer: torch.optim.Optimizer
    strategy: Strategy
    batches: Any  # ShardedBatches; PoissonBatches under privacy: dp_sgd
    steps: int
    scheduler: Any
    sparsity: SparsityController | None
    privacy: Any = None  # shoal.privacy.dp_sgd.DpSgd under privacy: dp_sgd

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def collective(self) -> bool:
        return self.strategy.collective_eval


def build_run(cfg: RunConfig, ctx: WorkerContext, group: Group, *, slowdown: Slowdown | None, attempt: int,
              rejoin: dict[str, Any] | None) -> Run:
    """Phase 1: data, task, model, optimizer, strategy, batches, schedule and masks from the config."""
    out = Path(cfg.out)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.train.tensorboard:
            preload_tensorboard()  # now, not after the workers start together
    data = build_dataset(cfg.data.dataset)
    task = build_task(cfg.task)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, data).to(ctx.device)
    if cfg.train.init_from:
        load_weights(model, cfg.train.init_from, ctx.device)
    if slowdown is not None:
        slowdown.attach(model)
    torch.manual_seed(cfg.seed + 1 + ctx.rank)  # per-worker stream for dropout and the like
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    strategy: Strategy = cfg.strategy.target(
        model,
        optimizer,
        options=cfg.strategy.options,
        codec=cfg.codec,
        context=ctx,
        loss_fn=task.loss,
        recipe=StepRecipe.from_config(cfg.train, ctx.device),
    )
    privacy = None
    if cfg.privacy is not None:  # per-example clipping and noise over Poisson-sampled batches
        from shoal.engine.privacy import build_private  # dp-accounting: only private runs import it

        privacy, batches = build_private(cfg, ctx, group, model, data.train, task.loss, strategy)
    else:
        shard, shards = strategy.data_shard()
        batches = ShardedBatches(data.train, rank=shard, world_size=shards, batch_size=cfg.data.batch_size,
                                 seed=cfg.seed)
        batches.split = strategy.split_batch(cfg.data.batch_size)
    steps = total_steps(cfg, batches.steps_per_epoch)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps)
    sparsity = SparsityController(cfg.prune, model, steps, strategy=strategy) if cfg.prune is not None else None
    return Run(cfg=cfg, ctx=ctx, group=group, out=out, slowdown=slowdown, attempt=attempt, rejoin=rejoin,
               data=data, task=task, optimizer=optimizer, strategy=strategy, batches=batches, steps=steps,
               scheduler=scheduler, sparsity=sparsity, privacy=privacy)
