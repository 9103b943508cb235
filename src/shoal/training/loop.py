"""The training loop every strategy runs under.

Builds data, model, optimizer and strategy from the config, optionally resumes
from the run's checkpoint, then steps, evaluates, logs and checkpoints. It is
strategy-agnostic: all a strategy has to provide is ``step``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from shoal.config import RunConfig
from shoal.data import ShardedBatches, build_dataset
from shoal.metrics.plots import plot_curves
from shoal.metrics.summary import Summary, write_json_atomic
from shoal.metrics.writer import MetricsWriter
from shoal.models import build_model, count_parameters
from shoal.netem.slowdown import Slowdown
from shoal.strategies.base import StepStats, Strategy, WorkerContext
from shoal.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from shoal.training.evaluate import evaluate
from shoal.training.group import Group, TorchGroup
from shoal.training.optim import build_optimizer, build_scheduler
from shoal.training.sparsity import SparsityController

CHECKPOINT = "checkpoint.pt"
FAULT = "fault.json"  # written by a worker killed by config fault.kill_rank


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


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
    out = Path(cfg.out)
    is_main = ctx.rank == 0
    if is_main:
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
    sparsity = SparsityController(cfg.prune, model, steps) if cfg.prune is not None else None
    if sparsity is not None:
        strategy.use_masks(sparsity)

    collective = strategy.collective_eval

    def run_eval() -> tuple[float, float]:
        if not collective and not is_main:
            return float("nan"), float("nan")  # rank 0 evaluates alone; nobody waits for it
        strategy.prepare_eval()
        return evaluate(
            strategy.eval_model,
            data.test,
            batch_size=cfg.data.eval_batch_size,
            device=ctx.device,
            rank=ctx.rank if collective else 0,
            world_size=ctx.world_size if collective else 1,
        )

    if rejoin is not None:
        resume = False
    elif not resume and attempt > 0:
        resume = group.broadcast_object((out / CHECKPOINT).is_file() if is_main else None)
    state = _RunState()
    if resume:
        state = _restore(out / CHECKPOINT, strategy, optimizer, scheduler, ctx, group)
        group.barrier()  # parameter servers: every shard restored before anyone pushes
    elif rejoin is not None:
        state.load(rejoin)
        state.wall_before = state.wall
        state.resumed_from = state.step
        with warnings.catch_warnings():  # the schedule where the dead worker left it (no optimizer step here)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state.step):
                scheduler.step()
        strategy.rejoin(state.step)
    else:
        group.barrier()  # start together (parameter servers: no worker runs alone while others still load)
    if sparsity is not None and state.sparsity:
        sparsity.restore(state.sparsity)  # resumed: the masks the checkpoint's weights were trained under
    strategy.progress(state.state_dict())  # past the start-up collectives: from here a restart rejoins
    if is_main:
        (out / "config.yaml").write_text(cfg.to_yaml())
    metrics = (MetricsWriter(out / "metrics.jsonl", resume_step=state.step if state.resumed_from is not None else None)
               if is_main else None)

    setup_s = time.perf_counter() - setup_started
    loop_started = time.perf_counter()
    restart_s = _restart_time(out) if attempt > 0 and is_main else None
    acc = loss_eval = float("nan")
    batch_iter = batches.iterate(state.step)
    progress = _Progress(is_main, steps, state.step)
    with progress if is_main else nullcontext():
        while state.step < steps:
            step_started = time.perf_counter()
            x, y = next(batch_iter)
            if sparsity is not None and sparsity.update(state.step):
                state.sparsity = sparsity.sparsity
            stats = strategy.step(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))
            if sparsity is not None:
                sparsity.apply()  # the optimizer step may have moved pruned weights
            spun_s = slowdown.after_step(stats.compute_s) if slowdown is not None else 0.0
            if (attempt == 0 and rejoin is None and cfg.fault.kill_rank == ctx.rank
                    and state.step + 1 == cfg.fault.kill_step):
                _die(out, ctx.rank, strategy, cfg.fault.target)
            scheduler.step()
            now = time.perf_counter()
            state.add(stats, step_s=now - step_started, wall=state.wall_before + now - loop_started)
            record: dict[str, Any] = {}
            if is_main and (state.step % cfg.train.log_every == 0 or state.step == steps):
                record = {
                    "step": state.step,
                    "time_s": round(state.clock, 6),
                    "wall_s": round(time.perf_counter() - loop_started, 6),
                    "loss": stats.loss,
                    "lr": scheduler.get_last_lr()[0],
                    "compute_s": stats.compute_s,
                    "comm_s": stats.comm_s,
                    "wire_bytes": stats.wire_bytes,
                    "dense_bytes": stats.dense_bytes,
                }
                if stats.staleness is not None:
                    record["staleness"] = stats.staleness
                if slowdown is not None and slowdown.method == "busy":
                    record["slowdown_s"] = spun_s  # of compute_s, the emulated slowness
            if is_main:
                progress.advance(stats.loss)
            if (state.step % cfg.train.eval_every == 0 or state.step == steps) and (collective or is_main):
                loss_eval, acc = run_eval()
                state.record_eval(acc, loss_eval, cfg.train.target_accuracy)
                if is_main:
                    record.update(step=state.step, time_s=round(state.clock, 6), test_loss=loss_eval, test_accuracy=acc)
                    progress.evaluated(state.step, loss_eval, acc, state.clock)
            if metrics is not None and record:
                metrics.write(record)
            strategy.progress(state.state_dict())
            reached = state.time_to_target is not None and cfg.train.stop_at_target
            # A checkpoint gathers every worker's state: only where workers keep in step.
            if (collective and cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
                    and state.step < steps):
                _checkpoint(out / CHECKPOINT, state, strategy, optimizer, scheduler, ctx, group)
            if reached and not collective:
                strategy.request_stop()
            if reached or strategy.finished():
                break

    extra = strategy.close()  # parameter servers: wait for all, pull the final model
    if math.isnan(acc) or not collective:  # resumed a finished run, or the final model was just pulled
        loss_eval, acc = run_eval()
    _checkpoint(out / CHECKPOINT, state, strategy, optimizer, scheduler, ctx, group)
    # Mean over workers of what each one handed to the process group.
    totals = group.all_reduce([state.wire_bytes, state.dense_bytes, state.comm_s, state.samples])
    per_worker = [value / ctx.world_size for value in totals]
    # Throughput over the longest worker's clock: under the parameter-server
    # strategies rank 0 may finish well before a slow worker.
    longest = group.all_reduce([state.clock], op="max")[0]
    if metrics is not None:
        metrics.close()
    if not is_main:
        return None

    wall = state.wall_before + time.perf_counter() - loop_started
    choice = getattr(strategy, "codec_choice", None)  # codec: auto
    summary = Summary(
        final_accuracy=acc,
        best_accuracy=state.best_accuracy,
        final_loss=loss_eval,
        target_accuracy=cfg.train.target_accuracy,
        time_to_target_s=state.time_to_target,
        steps_to_target=state.steps_to_target,
        wall_time_s=wall,
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
        parameters=count_parameters(strategy.eval_model),
        samples_per_s=per_worker[3] * ctx.world_size / max(longest, 1e-9),
        wire_bytes_per_worker=per_worker[0],
        dense_bytes_per_worker=per_worker[1],
        comm_s_per_worker=per_worker[2],
        resumed_from_step=state.resumed_from,
        **({"sparsity": sparsity.measured_sparsity(), "sparsity_target": cfg.prune.sparsity}
           if sparsity is not None else {}),
        **extra,
        restarts=attempt,
        restart_s=restart_s,
        out=str(out),
    )
    summary.write(out / "summary.json")
    plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{cfg.model.name} / {cfg.strategy.name} / {ctx.world_size} workers")
    return summary


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


def _checkpoint(path: Path, state: _RunState, strategy: Strategy, optimizer, scheduler, ctx: WorkerContext,
                group: Group) -> None:
    # Random streams and strategy state (error-feedback residuals, codec
    # generators) differ per worker: keep every worker's.
    strategy.prepare_eval()
    mine = {"rng": torch.get_rng_state(), "strategy": strategy.state_dict()}
    workers = group.all_gather_object(mine)
    if ctx.rank != 0:
        return
    save_checkpoint(
        path,
        {
            "run": state.state_dict(),
            "model": strategy.eval_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "workers": workers,
        },
    )


def _restart_time(out: Path) -> float | None:
    """Seconds from an injected kill to this attempt's first step (same machine only)."""
    try:
        return time.time() - json.loads((out / FAULT).read_text())["time"]
    except (OSError, ValueError, KeyError):
        return None


def _restore(path: Path, strategy: Strategy, optimizer, scheduler, ctx: WorkerContext, group: Group) -> _RunState:
    """Rank 0 reads the checkpoint and sends it to the others (no shared disk needed)."""
    saved = group.broadcast_object(load_checkpoint(path) if ctx.rank == 0 else None)
    strategy.eval_model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    workers = saved["workers"]
    if len(workers) == ctx.world_size:
        torch.set_rng_state(workers[ctx.rank]["rng"])
        strategy.load_state_dict(workers[ctx.rank]["strategy"])
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
