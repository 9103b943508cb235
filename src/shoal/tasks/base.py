"""The task interface: what a run minimises and what it is judged by.

A task gives the strategies their training loss, ``loss(outputs, targets)``,
and gives evaluation its statistics. Evaluation works in sums so that it
splits over batches and workers exactly (``shoal.engine.evaluate``):

1. per test batch, :meth:`Task.batch_sums` gives sums over the batch's
   items (``count`` is how many items a mean is over: samples, output
   values or tokens);
2. the sums are added over batches, then all-reduced over the workers;
3. :meth:`Task.metrics` turns the totals into named metrics, ``loss`` first.

One of them is the task's main metric (:attr:`Task.main_metric`, declared on
the class with :attr:`Task.higher_is_better`): targets, keep-best
checkpoints and early stopping follow it.

Every task takes two user entry points (:class:`TaskOptions`):
``loss=package.module:function``, a function ``(outputs, targets) -> scalar
tensor`` (a mean over the batch's items), replaces the training loss and the
reported ``loss``; ``metrics=package.module:function``, a function
``(outputs, targets) -> {name: sum over the batch's items}``, adds one metric
per name: its sum over the test set divided by the task's ``count``. So
``task: classification:loss=mypkg.losses:focal``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.registry import TASKS, Component, load_builtins, load_entry_point

Fn = Callable[[torch.Tensor, torch.Tensor], Any]


class TaskOptions(BaseModel):
    """Options every task takes: a user's loss and extra metrics, as entry points."""

    model_config = ConfigDict(extra="forbid")
    loss: str | None = Field(None, description="'package.module:function' (outputs, targets) -> scalar tensor, "
                             "a mean over the batch: the training loss (default: the task's own)")
    metrics: str | None = Field(None, description="'package.module:function' (outputs, targets) -> {name: sum "
                                "over the batch}: extra metrics, each its mean per item")

    @field_validator("loss", "metrics")
    @classmethod
    def _loads(cls, value: str | None) -> str | None:
        if value is not None:
            _load_fn(value)
        return value


def _load_fn(path: str) -> Fn:
    """A user's ``(outputs, targets)`` function; ``ValueError`` saying why it is not one."""
    fn = load_entry_point(path)
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(f"entry point {path!r} must take (outputs, targets)") from None
    except ValueError:  # builtins without a signature: accept
        pass
    return fn


class Task(ABC):
    """Base of every task: the loss, the evaluation sums and their metrics.

    A subclass declares :attr:`main_metric`, :attr:`higher_is_better`,
    :attr:`metric_names` (its own metrics after ``loss``), :attr:`sum_names`
    and :attr:`main_range` (where the main metric lies: a target outside it
    is refused), and implements :meth:`default_loss`, :meth:`own_sums` and
    :meth:`own_metrics`."""

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    main_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    metric_names: ClassVar[tuple[str, ...]]
    sum_names: ClassVar[tuple[str, ...]]  # own_sums' keys, in order (``loss`` and ``count`` among them)
    main_range: ClassVar[tuple[float, float | None]] = (-math.inf, None)

    def __init__(self, options: TaskOptions | None = None):
        self.options = options or self.Options()
        self._loss = _load_fn(self.options.loss) if self.options.loss else None
        self._metrics = _load_fn(self.options.metrics) if self.options.metrics else None

    @property
    def has_extra_metrics(self) -> bool:
        return self._metrics is not None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch, a scalar: the user's, else the task's own."""
        if self._loss is not None:
            return self._loss(outputs, targets)
        return self.default_loss(outputs, targets)

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One test batch's sums: the task's own (:attr:`sum_names`), then the user's metrics by name."""
        sums = self.own_sums(outputs, targets)
        if self._loss is not None:  # a mean over the batch's items, weighted by how many there are
            sums["loss"] = self._loss(outputs, targets).detach().double() * sums["count"]
        if self._metrics is not None:
            extra = self._metrics(outputs, targets)
            if not isinstance(extra, dict):
                raise TypeError(f"metrics entry point {self.options.metrics!r} returned "
                                f"{type(extra).__name__}, not a dict of name -> sum over the batch")
            clash = sorted(set(extra) & {"loss", *self.sum_names, *self.metric_names})
            if clash:
                raise ValueError(f"metrics entry point {self.options.metrics!r}: {clash} are the task's own names")
            sums.update({name: extra[name] for name in sorted(extra)})
        return sums

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """The named metrics of sums totalled over the test set: ``loss``, the task's, then the user's."""
        count = totals["count"]
        extra = {name: value / count for name, value in totals.items() if name not in self.sum_names}
        return {"loss": totals["loss"] / count, **self.own_metrics(totals), **extra}

    # --- what a task implements ---------------------------------------------
    @abstractmethod
    def default_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's own training loss: a mean over the batch's items."""

    @abstractmethod
    def own_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One batch's sums, keyed by :attr:`sum_names` (``loss``: of :meth:`default_loss`)."""

    @abstractmethod
    def own_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """The task's metrics (not ``loss``) from the totals of :meth:`own_sums`."""

    # --- the main metric ------------------------------------------------------
    @classmethod
    def check_target(cls, value: float) -> None:
        """``ValueError`` when ``value`` lies outside where the main metric can."""
        low, high = cls.main_range
        if not (value > low and (high is None or value <= high)):
            where = f"({low:g}, {high:g}]" if high is not None else f"({low:g}, inf)"
            raise ValueError(f"{cls.main_metric} lies in {where}; got {value:g}")


def improves(value: float, best: float | None, *, higher_is_better: bool, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best``, and by at least ``min_delta`` (the first value, unless NaN, does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    gain = value - best if higher_is_better else best - value
    return gain > 0 and gain >= min_delta


def reaches(value: float, target: float, *, higher_is_better: bool) -> bool:
    """Whether ``value`` is at the target or past it."""
    return value >= target if higher_is_better else value <= target


def build_task(component: Component | None = None) -> Task:
    """The task a resolved spec names (classification when none is given)."""
    if component is None:
        load_builtins(TASKS)
        component = TASKS.resolve("classification")
    return component.target(component.options)
