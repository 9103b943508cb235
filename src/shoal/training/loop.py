"""The training loop every strategy runs under.

:func:`run_training` runs one worker's part of a job in phases:

1. :func:`_build`: data, model, optimizer, strategy, batches and schedule from the config
2. :func:`_start_or_resume`: a fresh start, a resume from the run's checkpoint,
   or a rejoin of a job that trained on without this worker
3. :func:`_train`: step, log, evaluate and checkpoint until the last step or the target
4. :func:`_finish`: close the strategy, evaluate the final model, checkpoint, total the counters
5. :func:`_summarise`: rank 0 writes ``summary.json`` and the curves

It is strategy-agnostic: all a strategy has to provide is ``step``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shoal.config import FaultConfig, RunConfig
from shoal.data import DatasetBundle, ShardedBatches, build_dataset
from shoal.metrics.plots import plot_curves
from shoal.metrics.summary import Summary, per_worker_means, samples_per_s, write_json_atomic
from shoal.metrics.writer import MetricsWriter
from shoal.models import build_model, count_parameters
from shoal.netem.slowdown import Slowdown
from shoal.strategies.base import StepStats, Strategy, WorkerContext
from shoal.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from shoal.engine.evaluate import evaluate
from shoal.engine.group import Group, TorchGroup
from shoal.engine.optim import build_optimizer, build_scheduler
from shoal.engine.sparsity import SparsityController

CHECKPOINT = "checkpoint.pt"
FAULT = "fault.json"  # written by a worker killed by config fault.kill_rank


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def is_due(step: int, every: int, last: int) -> bool:
    """Log or evaluate after ``step``: every ``every`` steps, and after the last."""
    return step % every == 0 or step == last


def checkpoint_due(step: int, every: int, last: int) -> bool:
    """A checkpoint in the loop every ``every`` steps (0: none); the last step's comes after the loop."""
    return bool(every) and step % every == 0 and step < last


def kill_step(fault: FaultConfig, rank: int, *, first_start: bool) -> int | None:
    """The step after which config ``fault`` kills this worker: on its first start
    only (not after a restart, nor when it rejoins), or never (None)."""
    return fault.kill_step if first_start and fault.kill_rank == rank else None


def run_training(
    cfg: RunConfig, ctx: WorkerContext, *, resume: bool = False, slowdown: Slowdown | None = None,
    attempt: int = 0, group: Group | None = None, rejoin: dict[str, Any] | None = None,
) -> Summary | None:
    """Train on this worker; rank 0 returns the :class:`Summary`, others ``None``.

    ``attempt``: how many times the job's worker group was restarted before
    this start (the same on every rank); after a restart the run resumes from
    its last checkpoint. ``slowdown``: this worker's emulated slower hardware (busy-waiting hooks
    the model's forward; a cgroup quota needs nothing from the loop). ``group``: the
    collectives the loop needs (default: the process group). ``rejoin``: a worker
    restarted under a supervisor while the others train on: its counters when it
    died; it continues from there with the servers' current parameters."""
    group = group or TorchGroup(ctx.world_size, ctx.device)
    setup_started = time.perf_counter()
    run = _build(cfg, ctx, group, slowdown=slowdown, attempt=attempt, rejoin=rejoin)
    state = _start_or_resume(run, resume)
    metrics = _open_outputs(run, state)
    setup_s = time.perf_counter() - setup_started
    loop_started = time.perf_counter()
    restart_s = _restart_time(run.out) if attempt > 0 and run.is_main else None
    loss, acc = _train(run, state, metrics, loop_started)
    final = _finish(run, state, loss, acc)
    if metrics is not None:
        metrics.close()
    if not run.is_main:
        return None
    wall_s = state.wall_before + time.perf_counter() - loop_started
    return _summarise(run, state, final, setup_s=setup_s, wall_s=wall_s, restart_s=restart_s)


@dataclass(frozen=True)
class _Run:
    """One worker's run: what it was started with, and what :func:`_build` made
    from the config. Fixed once built; what changes as it trains is :class:`_RunState`."""

    cfg: RunConfig
    ctx: WorkerContext
    group: Group
    out: Path
    slowdown: Slowdown | None
    attempt: int
    rejoin: dict[str, Any] | None
    data: DatasetBundle
    optimizer: torch.optim.Optimizer
    strategy: Strategy
    batches: ShardedBatches
    steps: int
    scheduler: Any
    sparsity: SparsityController | None

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def collective(self) -> bool:
        return self.strategy.collective_eval


def _build(cfg: RunConfig, ctx: WorkerContext, group: Group, *, slowdown: Slowdown | None, attempt: int,
           rejoin: dict[str, Any] | None) -> _Run:
    """Phase 1: data, model, optimizer, strategy, batches, schedule and masks from the config."""
    out = Path(cfg.out)
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = build_dataset(cfg.data.dataset)
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
        loss_fn=F.cross_entropy,
    )
    shard, shards = strategy.data_shard()
    batches = ShardedBatches(data.train, rank=shard, world_size=shards, batch_size=cfg.data.batch_size, seed=cfg.seed)
    batches.split = strategy.split_batch(cfg.data.batch_size)
    steps = total_steps(cfg, batches.steps_per_epoch)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps)
    sparsity = SparsityController(cfg.prune, model, steps, strategy=strategy) if cfg.prune is not None else None
    return _Run(cfg=cfg, ctx=ctx, group=group, out=out, slowdown=slowdown, attempt=attempt, rejoin=rejoin,
                data=data, optimizer=optimizer, strategy=strategy, batches=batches, steps=steps,
                scheduler=scheduler, sparsity=sparsity)


def _start_or_resume(run: _Run, resume: bool) -> _RunState:
    """Phase 2: the counters to start from. A resume (asked for, or after the
    group restarted with a checkpoint on disk) restores the whole run; a rejoin
    takes the counters the dead worker left and the strategy catches up."""
    group, strategy = run.group, run.strategy
    if run.rejoin is not None:
        resume = False
    elif not resume and run.attempt > 0:
        resume = group.broadcast_object((run.out / CHECKPOINT).is_file() if run.is_main else None)
    state = _RunState()
    if resume:
        state = _restore(run)
        group.barrier()  # parameter servers: every shard restored before anyone pushes
    elif run.rejoin is not None:
        state.load(run.rejoin)
        state.wall_before = state.wall
        state.resumed_from = state.step
        with warnings.catch_warnings():  # the schedule where the dead worker left it (no optimizer step here)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state.step):
                run.scheduler.step()
        strategy.rejoin(state.step)
    else:
        group.barrier()  # start together (parameter servers: no worker runs alone while others still load)
    if run.sparsity is not None and state.sparsity:
        run.sparsity.restore(state.sparsity)  # resumed: the masks the checkpoint's weights were trained under
    strategy.progress(state.state_dict())  # past the start-up collectives: from here a restart rejoins
    return state


def _open_outputs(run: _Run, state: _RunState) -> MetricsWriter | None:
    """Rank 0 writes the run's config and opens its metrics log (a resumed run's cut back to where it resumed)."""
    if not run.is_main:
        return None
    (run.out / "config.yaml").write_text(run.cfg.to_yaml())
    return MetricsWriter(run.out / "metrics.jsonl", resume_step=state.step if state.resumed_from is not None else None)


def _train(run: _Run, state: _RunState, metrics: MetricsWriter | None, loop_started: float) -> tuple[float, float]:
    """Phase 3: step until the last step, the target (train.stop_at_target) or
    the strategy's stop; log, evaluate and checkpoint when due. Returns the last
    evaluation's (loss, accuracy): NaN when none ran."""
    cfg, strategy, steps = run.cfg, run.strategy, run.steps
    loss = acc = float("nan")
    batch_iter = run.batches.iterate(state.step)
    kill_at = kill_step(cfg.fault, run.ctx.rank, first_start=run.attempt == 0 and run.rejoin is None)
    progress = _Progress(run.is_main, steps, state.step)
    with progress if run.is_main else nullcontext():
        while state.step < steps:
            stats, spun_s = _step(run, state, batch_iter, loop_started=loop_started, kill_at=kill_at)
            record: dict[str, Any] = {}
            if run.is_main and is_due(state.step, cfg.train.log_every, steps):
                record = _log_record(run, state, stats, spun_s, loop_started)
            if run.is_main:
                progress.advance(stats.loss)
            if is_due(state.step, cfg.train.eval_every, steps) and (run.collective or run.is_main):
                loss, acc = _evaluate(run)
                state.record_eval(acc, loss, cfg.train.target_accuracy)
                if run.is_main:
                    record.update(step=state.step, time_s=round(state.clock, 6), test_loss=loss, test_accuracy=acc)
                    progress.evaluated(state.step, loss, acc, state.clock)
            if metrics is not None and record:
                metrics.write(record)
            strategy.progress(state.state_dict())
            reached = state.time_to_target is not None and cfg.train.stop_at_target
            # A checkpoint gathers every worker's state: only where workers keep in step.
            if run.collective and checkpoint_due(state.step, cfg.train.checkpoint_every, steps):
                _checkpoint(run, state)
            if reached and not run.collective:
                strategy.request_stop()
            if reached or strategy.finished():
                break
    return loss, acc


def _step(run: _Run, state: _RunState, batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]], *,
          loop_started: float, kill_at: int | None) -> tuple[StepStats, float]:
    """One training step, counted into ``state``; returns its stats and the seconds a busy slowdown spun."""
    step_started = time.perf_counter()  # fetching the batch counts as training time
    x, y = next(batch_iter)
    if run.sparsity is not None and run.sparsity.update(state.step):
        state.sparsity = run.sparsity.sparsity
    device = run.ctx.device
    stats = run.strategy.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if run.sparsity is not None:
        run.sparsity.apply()  # the optimizer step may have moved pruned weights
    spun_s = run.slowdown.after_step(stats.compute_s) if run.slowdown is not None else 0.0
    if state.step + 1 == kill_at:
        _die(run.out, run.ctx.rank, run.strategy, run.cfg.fault.target)
    run.scheduler.step()
    now = time.perf_counter()
    state.add(stats, step_s=now - step_started, wall=state.wall_before + now - loop_started)
    return stats, spun_s


def _log_record(run: _Run, state: _RunState, stats: StepStats, spun_s: float, loop_started: float) -> dict[str, Any]:
    """The step's line of metrics.jsonl (an evaluation adds its results to it)."""
    record: dict[str, Any] = {
        "step": state.step,
        "time_s": round(state.clock, 6),
        "wall_s": round(time.perf_counter() - loop_started, 6),
        "loss": stats.loss,
        "lr": run.scheduler.get_last_lr()[0],
        "compute_s": stats.compute_s,
        "comm_s": stats.comm_s,
        "wire_bytes": stats.wire_bytes,
        "dense_bytes": stats.dense_bytes,
    }
    if stats.staleness is not None:
        record["staleness"] = stats.staleness
    if run.slowdown is not None and run.slowdown.method == "busy":
        record["slowdown_s"] = spun_s  # of compute_s, the emulated slowness
    return record


def _evaluate(run: _Run) -> tuple[float, float]:
    """(test loss, test accuracy) of the whole current model; NaN on the ranks that do not evaluate."""
    if not run.collective and not run.is_main:
        return float("nan"), float("nan")  # rank 0 evaluates alone; nobody waits for it
    run.strategy.prepare_eval()
    return evaluate(
        run.strategy.eval_model,
        run.data.test,
        batch_size=run.cfg.data.eval_batch_size,
        device=run.ctx.device,
        rank=run.ctx.rank if run.collective else 0,
        world_size=run.ctx.world_size if run.collective else 1,
    )


@dataclass(frozen=True)
class _Final:
    """What the job ended with: the final model's test figures, the strategy's
    own summary fields, and the counters as means over the workers."""

    loss: float
    accuracy: float
    extra: dict[str, Any]
    wire_bytes: float
    dense_bytes: float
    comm_s: float
    samples: float
    longest_clock_s: float


def _finish(run: _Run, state: _RunState, loss: float, acc: float) -> _Final:
    """Phase 4, on every rank: close the strategy, evaluate the final model
    unless the last step just did, checkpoint, and total the counters."""
    extra = run.strategy.close()  # parameter servers: wait for all, pull the final model
    if math.isnan(acc) or not run.collective:  # resumed a finished run, or the final model was just pulled
        loss, acc = _evaluate(run)
    _checkpoint(run, state)
    # Mean over workers of what each one handed to the process group.
    totals = run.group.all_reduce([state.wire_bytes, state.dense_bytes, state.comm_s, state.samples])
    wire, dense, comm_s, samples = per_worker_means(totals, run.ctx.world_size)
    longest = run.group.all_reduce([state.clock], op="max")[0]
    return _Final(loss=loss, accuracy=acc, extra=extra, wire_bytes=wire, dense_bytes=dense, comm_s=comm_s,
                  samples=samples, longest_clock_s=longest)


def _summarise(run: _Run, state: _RunState, final: _Final, *, setup_s: float, wall_s: float,
               restart_s: float | None) -> Summary:
    """Phase 5, rank 0: summary.json and the curves."""
    cfg, ctx, sparsity = run.cfg, run.ctx, run.sparsity
    choice = getattr(run.strategy, "codec_choice", None)  # codec: auto
    summary = Summary(
        final_accuracy=final.accuracy,
        best_accuracy=state.best_accuracy,
        final_loss=final.loss,
        target_accuracy=cfg.train.target_accuracy,
        time_to_target_s=state.time_to_target,
        steps_to_target=state.steps_to_target,
        wall_time_s=wall_s,
        train_time_s=state.clock,
        setup_s=setup_s,
        steps=state.step,
        workers=ctx.world_size,
        strategy=cfg.strategy.name,
        codec=cfg.codec.name,
        codec_chosen=choice.codec if choice else None,
        codec_auto=choice.as_dict() if choice else None,
        model=cfg.model.name,
        dataset=cfg.data.dataset.name,
        parameters=count_parameters(run.strategy.eval_model),
        samples_per_s=samples_per_s(final.samples, ctx.world_size, final.longest_clock_s),
        wire_bytes_per_worker=final.wire_bytes,
        dense_bytes_per_worker=final.dense_bytes,
        comm_s_per_worker=final.comm_s,
        resumed_from_step=state.resumed_from,
        **({"sparsity": sparsity.measured_sparsity(), "sparsity_target": cfg.prune.sparsity}
           if sparsity is not None else {}),
        **final.extra,
        restarts=run.attempt,
        restart_s=restart_s,
        out=str(run.out),
    )
    summary.write(run.out / "summary.json")
    plot_curves(run.out / "metrics.jsonl", run.out / "curves.png",
                title=f"{cfg.model.name} / {cfg.strategy.name} / {ctx.world_size} workers")
    return summary


class _Progress:
    """Rank 0's progress bar and one printed line per evaluation."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.console = Console()
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", acc="-")

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def advance(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def evaluated(self, step: int, loss: float, acc: float, clock: float) -> None:
        self.bar.update(self.task, acc=f"{acc:.4f}")
        if self.enabled:
            self.console.print(f"step {step:>6}  test loss {loss:.4f}  test acc {acc:.4f}  {clock:7.1f}s")


class _RunState:
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


def _die(out: Path, rank: int, strategy: Strategy, target: str) -> None:
    """The injected fault: note when, then SIGKILL this worker (no cleanup, as a
    crash); ``target="server"``: the process serving its parameter shard instead."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / FAULT, {"rank": rank, "target": target, "time": time.time()})
    if target == "server":
        strategy.kill_server()  # does not return
    os.kill(os.getpid(), signal.SIGKILL)


def _checkpoint(run: _Run, state: _RunState) -> None:
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


def _restart_time(out: Path) -> float | None:
    """Seconds from an injected kill to this attempt's first step (same machine only)."""
    try:
        return time.time() - json.loads((out / FAULT).read_text())["time"]
    except (OSError, ValueError, KeyError):
        return None


def _restore(run: _Run) -> _RunState:
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
    state = _RunState()
    state.load(saved["run"])
    state.wall_before = state.wall
    state.resumed_from = state.step
    return state
