"""The end-of-run summary, written to ``OUT/summary.json`` and returned by ``shoal.train``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class Summary(BaseModel):
    """The run's figures. The task's main metric is ``metric`` (``final_metric``,
    ``best_metric``, ``target``, and every final metric in ``final_metrics``);
    the ``*_accuracy`` fields are classification's and null for other tasks."""

    model_config = ConfigDict(extra="allow")

    final_accuracy: float | None
    best_accuracy: float | None
    final_loss: float
    target_accuracy: float | None
    task: str = "classification"  # the task's spec
    metric: str = "accuracy"  # the task's main metric
    higher_is_better: bool = True
    final_metric: float | None = None
    best_metric: float | None = None
    best_step: int | None = None  # of the best evaluation (train.keep_best: best.pt holds its weights)
    target: float | None = None  # of the main metric
    final_metrics: dict[str, float] = {}  # the final model's test metrics, loss first
    stopped_early_at_step: int | None = None  # train.early_stopping ended the run after this step
    best_checkpoint: str | None = None  # train.keep_best: OUT/best.pt
    time_to_target_s: float | None
    steps_to_target: int | None
    wall_time_s: float
    train_time_s: float
    setup_s: float
    steps: int
    workers: int
    strategy: str
    codec: str
    codec_chosen: str | None = None  # codec: auto's choice
    codec_auto: dict[str, Any] | None = None  # what auto measured and predicted
    model: str
    dataset: str
    parameters: int
    samples_per_s: float
    wire_bytes_per_worker: float
    dense_bytes_per_worker: float
    comm_s_per_worker: float
    resumed_from_step: int | None
    updates: float | None = None  # parameter servers: pushes applied per shard
    privacy: dict[str, Any] | None = None  # privacy: dp_sgd: the (epsilon, delta) spent, the mechanism, the sampler
    mean_staleness: float | None = None  # parameter servers: over all applied pushes
    dropped_pushes: float | None = None  # sync:backup=b: late gradients dropped, per shard
    worker_restarts: int | None = None  # parameter servers: worker processes restarted while the rest trained on
    restarts: int
    restart_s: float | None = None  # from an injected kill (fault.kill_rank) to the resumed first step
    out: str

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.model_dump())


def per_worker_means(totals: Sequence[float], workers: int) -> list[float]:
    """Each of ``totals`` (summed over the workers) as the mean of one worker."""
    return [value / workers for value in totals]


def samples_per_s(samples_per_worker: float, workers: int, longest_clock_s: float) -> float:
    """The job's throughput: every worker's samples over the longest worker's
    training clock (under the parameter servers rank 0 may finish well before a
    slow worker)."""
    return samples_per_worker * workers / max(longest_clock_s, 1e-9)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
