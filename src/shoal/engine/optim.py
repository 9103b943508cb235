"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from shoal.config import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_change(cfg: ScheduleConfig, lr: float, done: int, old_total: int, new_total: int) -> str | None:
    """What resuming after ``done`` steps with ``new_total`` steps instead of
    ``old_total`` does to the learning rate, in a sentence; None when nothing changes.

    Only a cosine schedule depends on the total: it is stretched (or squeezed)
    over the new total, so the learning rate jumps at the resume."""
    if old_total == new_total or cfg.name != "cosine" or done <= cfg.warmup_steps:
        return None
    before, after = lr * lr_factor(cfg, done - 1, old_total), lr * lr_factor(cfg, done, new_total)
    return (f"train.steps {old_total} -> {new_total}: the cosine schedule now spans {new_total} steps, so the "
            f"learning rate goes from {before:.4g} at step {done} to {after:.4g} at step {done + 1} "
            "(keep train.steps, or set schedule.name=constant, for no jump)")


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total_steps))
