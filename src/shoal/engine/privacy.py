"""Sample-level differential privacy around a training run: the plan checked before any worker
starts, and the mechanism every worker builds (``privacy: dp_sgd``, :mod:`shoal.privacy.dp_sgd`).

Both compute the same :class:`~shoal.privacy.dp_sgd.Plan` from the same inputs (the training
set's size, the job's world size, the batch and the run's length): the launching process to
refuse a run that cannot fit its budget (a config error, exit 2) and print the header line, rank 0
of the job to fix the noise every worker uses (broadcast, so all ranks agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shoal.data.shard import fetch

if TYPE_CHECKING:  # the mechanism imports dp-accounting (most of a second): only runs with privacy pay it
    from shoal.privacy.dp_sgd import DpSgd, Plan


def dp_sgd_plan(cfg: Any, train_size: int, world_size: int) -> "Plan":
    """The noise and the spend of ``cfg``'s run on ``world_size`` workers; ValueError when it cannot fit."""
    from shoal.privacy.dp_sgd import plan, run_steps, sampling

    rate, examples, per_pass = sampling(train_size, world_size, cfg.data.batch_size)
    return plan(cfg.privacy.options, sampling_rate=rate, examples=examples, steps=run_steps(cfg.train, per_pass))


def check_private_model(cfg: Any, model: nn.Module, train: Any, loss_fn: Any) -> None:
    """ValueError when DP-SGD cannot train ``model``: BatchNorm, or per-example gradients that
    ``torch.func`` cannot take through it (tried on two training examples)."""
    from shoal.privacy.dp_sgd import check_model, per_example_gradients

    check_model(model, f"model {cfg.model.spec()}")
    x, y = fetch(train, [0, 1] if len(train) > 1 else [0])
    try:
        per_example_gradients(model, loss_fn, x, y)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"privacy: dp_sgd cannot take per-example gradients of model {cfg.model.spec()} "
                         f"(torch.func.vmap over its forward failed: {reason})") from None


def preflight(cfg: Any, world_size: int) -> tuple[Any, "Plan | None"]:
    """In the launching process: ``(cfg, plan)``, the config with the calibrated noise written in
    (the workers, the saved config.yaml and a resume use that noise), or ``(cfg, None)`` without
    ``privacy``. ValueError naming the field for a model it cannot train or a budget the run cannot fit."""
    if cfg.privacy is None:
        return cfg, None
    from shoal.data import build_dataset
    from shoal.models.build import build_model
    from shoal.tasks.base import build_task

    data = build_dataset(cfg.data.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data)
    check_private_model(cfg, model, data.train, build_task(cfg.task).loss)
    found = dp_sgd_plan(cfg, len(data.train), world_size)
    return with_noise(cfg, found.noise_multiplier), found


def with_noise(cfg: Any, noise_multiplier: float) -> Any:
    """``cfg`` with ``privacy``'s noise multiplier set (the calibrated one)."""
    from dataclasses import replace

    component = cfg.privacy
    options = component.options.model_copy(update={"noise_multiplier": noise_multiplier})
    return cfg.model_copy(update={"privacy": replace(component, options=options)})


def build_private(cfg: Any, ctx: Any, group: Any, model: nn.Module, train: Any, loss_fn: Any,
                  strategy: Any) -> tuple["DpSgd", Any]:
    """In every worker: ``(mechanism, batches)``. Rank 0 plans (the noise, checked against the budget)
    and tells the others; the strategy then steps by DP-SGD over Poisson-sampled batches."""
    from shoal.data.poisson import PoissonBatches
    from shoal.privacy.dp_sgd import DpSgd, check_model, sampling

    check_model(model, f"model {cfg.model.spec()}")
    rate, _, per_pass = sampling(len(train), ctx.world_size, cfg.data.batch_size)
    found = group.broadcast_object(dp_sgd_plan(cfg, len(train), ctx.world_size) if ctx.rank == 0 else None)
    options = cfg.privacy.options
    mechanism = DpSgd(options, plan=found, rank=ctx.rank, seed=cfg.seed)
    batches = PoissonBatches(train, rank=ctx.rank, world_size=ctx.world_size, rate=rate, steps_per_epoch=per_pass,
                             layout_seed=cfg.seed, seed=cfg.seed if options.reproducible_noise else None)
    strategy.use_dp_sgd(mechanism)
    return mechanism, batches
