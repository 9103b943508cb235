"""The training loop every strategy runs under.

:func:`run_training` runs one worker's part of a job in phases:

1. :func:`~shoal.training.build.build_run`: data, model, optimizer, strategy, batches and
   schedule from the config
2. :func:`_start_or_resume`: a fresh start, a resume from the run's checkpoint,
   or a rejoin of a job that trained on without this worker
3. :func:`_train`: step, log, evaluate and checkpoint until the last step, the target or
   early stopping; evaluations follow the task's main metric (keep-best writes ``best.pt``)
4. :func:`~shoal.training.finish.finish_run`: close the strategy, evaluate the final model, checkpoint, total the counters
5. :func:`~shoal.training.finish.summarise_run`: rank 0 writes ``summary.json`` and the curves

It is strategy-agnostic: all a strategy has to provide is ``step``. The run's
counters and checkpoint are in :mod:`~shoal.training.state`, fault injection in
:mod:`~shoal.training.faults`, the console's progress bar in :mod:`~shoal.training.progress`.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any, Iterator

import torch

from shoal.config import RunConfig
from shoal.metrics.summary import Summary
from shoal.metrics.writer import MetricsWriter
from shoal.netem.slowdown import Slowdown
from shoal.strategies.base import StepStats, WorkerContext
from shoal.engine.group import Group, TorchGroup
from shoal.training.build import Run, build_run
from shoal.training.faults import die, kill_step, restart_time
from shoal.training.finish import evaluate_run, finish_run, summarise_run
from shoal.training.progress import TrainProgress
from shoal.training.state import CHECKPOINT, RunState, checkpoint_run, restore_run, save_best
from shoal.engine.stop import STOPPED, GracefulStop, write_stopped


def is_due(step: int, every: int, last: int) -> bool:
    """Log or evaluate after ``step``: every ``every`` steps, and after the last."""
    return step % every == 0 or step == last


def checkpoint_due(step: int, every: int, last: int) -> bool:
    """A checkpoint in the loop every ``every`` steps (0: none); the last step's comes after the loop."""
    return bool(every) and step % every == 0 and step < last


def run_training(
    cfg: RunConfig, ctx: WorkerContext, *, resume: bool = False, slowdown: Slowdown | None = None,
    attempt: int = 0, group: Group | None = None, rejoin: dict[str, Any] | None = None,
    stop: GracefulStop | None = None,
) -> Summary | None:
    """Train on this worker; rank 0 returns the :class:`Summary`, others ``None``.

    ``attempt``: how many times the job's worker group was restarted before
    this start (the same on every rank); after a restart the run resumes from
    its last checkpoint. ``slowdown``: this worker's emulated slower hardware (busy-waiting hooks
    the model's forward; a cgroup quota needs nothing from the loop). ``group``: the
    collectives the loop needs (default: the process group). ``rejoin``: a worker
    restarted under a supervisor while the others train on: its counters when it
    died; it continues from there with the servers' current parameters. ``stop``: the
    worker's SIGINT/SIGTERM record; after one the run stops at an agreed step
    boundary, checkpoints, writes ``stopped.json`` and returns None on every rank."""
    group = group or TorchGroup(ctx.world_size, ctx.device)
    stop = stop or GracefulStop()
    setup_started = time.perf_counter()
    run = build_run(cfg, ctx, group, slowdown=slowdown, attempt=attempt, rejoin=rejoin)
    state = _start_or_resume(run, resume)
    metrics = _open_outputs(run, state)
    setup_s = time.perf_counter() - setup_started
    loop_started = time.perf_counter()
    restart_s = restart_time(run.out) if attempt > 0 and run.is_main else None
    evaluated = _train(run, state, metrics, loop_started, stop)
    stopped = _stopped_by_a_signal(run, state, stop)
    final = finish_run(run, state, evaluated, evaluate_final=not stopped)
    if metrics is not None:
        metrics.close()
    if stopped:
        if run.is_main:
            write_stopped(run.out, stop.signal.name if stop.signal else "a signal", state.step)
        return None
    if not run.is_main:
        return None
    wall_s = state.wall_before + time.perf_counter() - loop_started
    return summarise_run(run, state, final, setup_s=setup_s, wall_s=wall_s, restart_s=restart_s)


def _start_or_resume(run: Run, resume: bool) -> RunState:
    """Phase 2: the counters to start from. A resume (asked for, or after the
    group restarted with a checkpoint on disk) restores the whole run; a rejoin
    takes the counters the dead worker left and the strategy catches up."""
    group, strategy = run.group, run.strategy
    if run.rejoin is not None:
        resume = False
    elif not resume and run.attempt > 0:
        resume = group.broadcast_object((run.out / CHECKPOINT).is_file() if run.is_main else None)
    state = RunState()
    if resume:
        state = restore_run(run)
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
    if run.privacy is not None:  # one PLD composition for the rest of the run, not one a step
        run.privacy.ledger.would_exceed(max(1, run.steps - run.privacy.ledger.steps))
    strategy.progress(state.state_dict())  # past the start-up collectives: from here a restart rejoins
    return state


def _open_outputs(run: Run, state: RunState) -> MetricsWriter | None:
    """Rank 0 writes the run's config and opens its metrics log (a resumed run's cut back to where it resumed)."""
    if not run.is_main:
        return None
    (run.out / "config.yaml").write_text(run.cfg.to_yaml())
    (run.out / STOPPED).unlink(missing_ok=True)  # a stopped run resumed: no longer stopped
    return MetricsWriter(run.out / "metrics.jsonl", resume_step=state.step if state.resumed_from is not None else None,
                         tensorboard=run.cfg.train.tensorboard)


def _train(run: Run, state: RunState, metrics: MetricsWriter | None, loop_started: float,
           stop: GracefulStop) -> dict[str, float]:
    """Phase 3: step until the last step, the target (train.stop_at_target),
    the strategy's stop or the agreed step after a signal; log, evaluate and
    checkpoint when due; early stopping (train.early_stopping) ends it too.
    Returns the last evaluation's metrics: none when none ran."""
    cfg, strategy, steps = run.cfg, run.strategy, run.steps
    evaluated: dict[str, float] = {}
    batch_iter = run.batches.iterate(state.step)
    kill_at = kill_step(cfg.fault, run.ctx.rank, first_start=run.attempt == 0 and run.rejoin is None)
    progress = TrainProgress(run.is_main, steps, state.step, metric=run.task.main_metric)
    with progress if run.is_main else nullcontext():
        while state.step < steps and state.stopped_early_at is None:  # a resumed run that stopped early stays so
            if _budget_spent(run, progress):
                break
            stats, spun_s = _step(run, state, batch_iter, loop_started=loop_started, kill_at=kill_at)
            record: dict[str, Any] = {}
            if run.is_main and is_due(state.step, cfg.train.log_every, steps):
                record = _log_record(run, state, stats, spun_s, loop_started)
            if run.is_main:
                progress.advance(stats.loss)
            if is_due(state.step, cfg.train.eval_every, steps) and (run.collective or run.is_main):
                evaluated = evaluate_run(run)
                _record_eval(run, state, evaluated)
                if run.is_main:
                    record.update(step=state.step, time_s=round(state.clock, 6),
                                  **{f"test_{name}": value for name, value in evaluated.items()})
                    if run.privacy is not None:
                        record["epsilon"] = run.privacy.ledger.spent()
                    progress.evaluated(state.step, evaluated, state.clock)
            if metrics is not None and record:
                metrics.write(record)
            strategy.progress(state.state_dict())
            done = state.stopped_early_at is not None or state.time_to_target is not None and cfg.train.stop_at_target
            # A checkpoint gathers every worker's state: only where workers keep in step.
            if run.collective and checkpoint_due(state.step, cfg.train.checkpoint_every, steps):
                checkpoint_run(run, state)
            if done and not run.collective:
                strategy.request_stop()
            signalled = _signalled(run, state, stop)  # asked every step, even when another reason ends it
            if done or strategy.finished() or signalled:
                break
    return evaluated


def _budget_spent(run: Run, progress: TrainProgress) -> bool:
    """privacy: the next step would take epsilon past target_epsilon (every rank's ledger is the
    same: they all stop here). The launcher refuses a run planned past its budget, so this is the
    last line: a run resumed or rejoined past what was planned."""
    ledger = run.privacy.ledger if run.privacy is not None else None
    if ledger is None or not ledger.would_exceed(1):
        return False
    run.privacy.stopped_by_budget = True
    if run.is_main:
        progress.note(f"privacy budget spent: step {ledger.steps + 1} would take epsilon past "
                      f"target_epsilon={ledger.target_epsilon:g} (spent {ledger.spent():.3g}); stopping")
    return True


def _record_eval(run: Run, state: RunState, evaluated: dict[str, float]) -> None:
    """Count an evaluation on the task's main metric: a new best (keep_best writes
    best.pt), the target, early stopping's patience (spent before the last step: stop)."""
    train, task = run.cfg.train, run.task
    best = state.record_eval(evaluated[task.main_metric], higher_is_better=task.higher_is_better,
                             target=train.main_target, early_stopping=train.early_stopping)
    if best and train.keep_best and run.is_main:
        save_best(run, state, evaluated)
    if state.patience_spent(train.early_stopping) and state.step < run.steps:
        state.stopped_early_at = state.step


def _stopped_by_a_signal(run: Run, state: RunState, stop: GracefulStop) -> bool:
    """Whether a SIGINT/SIGTERM ended the loop before its last step (one after the loop ended
    changes nothing). Under the parameter servers another worker's signal may have ended it
    (the servers told everyone) before this worker's own arrived: a loop that ended early,
    neither at the target nor by early stopping, was stopped."""
    at_target = state.time_to_target is not None and run.cfg.train.stop_at_target
    # Ended at its last step, its target or by early stopping: finished, whatever signal came
    # with it (in step, every rank decides alike: they all evaluated).
    if state.step >= run.steps or at_target or state.stopped_early_at is not None:
        return False
    if stop.after is not None:
        return True
    if run.collective or not run.strategy.finished():
        return False
    if run.is_main:  # rank 0 alone knows the target and early stopping: the others need not wait
        stop.wait(2.0)  # this worker's own signal is on its way: name it in stopped.json
    return True


def _signalled(run: Run, state: RunState, stop: GracefulStop) -> bool:
    """Whether a SIGINT/SIGTERM ends the loop after this step (see :mod:`~shoal.engine.stop`)."""
    after = stop.stop_after(state.step, run.strategy.stop_margin())
    if after is None:
        return False
    if not run.collective:  # workers out of step: the servers tell them all, as at a target
        run.strategy.request_stop()
        return False
    return state.step >= after


def _step(run: Run, state: RunState, batch_iter: Iterator[tuple[torch.Tensor, torch.Tensor]], *,
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
        die(run.out, run.ctx.rank, run.strategy, run.cfg.fault.target)
    run.scheduler.step()
    now = time.perf_counter()
    state.add(stats, step_s=now - step_started, wall=state.wall_before + now - loop_started)
    return stats, spun_s


def _log_record(run: Run, state: RunState, stats: StepStats, spun_s: float, loop_started: float) -> dict[str, Any]:
    """The step's line of metrics.jsonl (an evaluation adds its results to it)."""
    record: dict[str, Any] = {
        "step": state.step,
        "time_s": round(state.clock, 6),
        "wall_s": round(state.wall_before + time.perf_counter() - loop_started, 6),  # all sessions
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
