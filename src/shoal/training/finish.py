"""The end of a worker's run: the final evaluation, the last checkpoint and the
counters totalled over the workers (phase 4, every rank), then ``summary.json``
and the curves (phase 5, rank 0). Evaluation of the current model, which the
loop also runs when due, is here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.engine.evaluate import evaluate_task
from shoal.metrics.plots import plot_curves
from shoal.metrics.summary import Summary, per_worker_means, samples_per_s
from shoal.models import count_parameters
from shoal.training.build import Run
from shoal.training.state import BEST, RunState, checkpoint_run


def evaluate_run(run: Run) -> dict[str, float]:
    """The task's test metrics of the whole current model; none on the ranks that do not evaluate."""
    if not run.collective and not run.is_main:
        return {}  # rank 0 evaluates alone; nobody waits for it
    run.strategy.prepare_eval()
    return evaluate_task(
        run.strategy.eval_model,
        run.data.test,
        run.task,
        batch_size=run.cfg.data.eval_batch_size,
        device=run.ctx.device,
        rank=run.ctx.rank if run.collective else 0,
        world_size=run.ctx.world_size if run.collective else 1,
    )


@dataclass(frozen=True)
class Final:
    """What the job ended with: the final model's test figures, the strategy's
    own summary fields, and the counters as means over the workers."""

    metrics: dict[str, float]  # the task's, loss first
    extra: dict[str, Any]
    wire_bytes: float
    dense_bytes: float
    comm_s: float
    samples: float
    longest_clock_s: float


def finish_run(run: Run, state: RunState, evaluated: dict[str, float], *, evaluate_final: bool = True) -> Final:
    """Phase 4, on every rank: close the strategy, evaluate the final model
    unless the last step just did (or the run was stopped), checkpoint, and
    total the counters."""
    extra = run.strategy.close()  # parameter servers: wait for all, pull the final model
    if evaluate_final and (not evaluated or not run.collective):  # resumed a finished run, or just pulled
        evaluated = evaluate_run(run)
    checkpoint_run(run, state)
    # Mean over workers of what each one handed to the process group.
    totals = run.group.all_reduce([state.wire_bytes, state.dense_bytes, state.comm_s, state.samples])
    wire, dense, comm_s, samples = per_worker_means(totals, run.ctx.world_size)
    longest = run.group.all_reduce([state.clock], op="max")[0]
    return Final(metrics=evaluated, extra=extra, wire_bytes=wire, dense_bytes=dense, comm_s=comm_s,
                  samples=samples, longest_clock_s=longest)


def summarise_run(run: Run, state: RunState, final: Final, *, setup_s: float, wall_s: float,
               restart_s: float | None) -> Summary:
    """Phase 5, rank 0: summary.json and the curves."""
    cfg, ctx, sparsity = run.cfg, run.ctx, run.sparsity
    choice = getattr(run.strategy, "codec_choice", None)  # codec: auto
    main = run.task.main_metric
    classification = main == "accuracy"  # the *_accuracy fields: classification's, null for other tasks
    summary = Summary(
        final_accuracy=final.metrics["accuracy"] if classification else None,
        best_accuracy=state.best_metric if classification else None,
        final_loss=final.metrics["loss"],
        target_accuracy=cfg.train.main_target if classification else None,
        task=cfg.task.spec(),
        metric=main,
        higher_is_better=run.task.higher_is_better,
        final_metric=final.metrics[main],
        best_metric=state.best_metric,
        best_step=state.best_step,
        target=cfg.train.main_target,
        final_metrics=final.metrics,
        stopped_early_at_step=state.stopped_early_at,
        best_checkpoint=str(run.out / BEST) if cfg.train.keep_best and (run.out / BEST).is_file() else None,
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
        **({"privacy": run.privacy.report()} if run.privacy is not None else {}),
        restarts=run.attempt,
        restart_s=restart_s,
        out=str(run.out),
    )
    summary.write(run.out / "summary.json")
    plot_curves(run.out / "metrics.jsonl", run.out / "curves.png",
                title=f"{cfg.model.name} / {cfg.strategy.name} / {ctx.world_size} workers", metric=main)
    return summary
