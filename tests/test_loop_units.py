"""The training loop's and the pipeline's summary maths, without processes."""

import json
import time

import pytest

from shoal.config import FaultConfig, load_config
from shoal.metrics.summary import per_worker_means, samples_per_s
from shoal.parallel.partition import imbalance
from shoal.parallel.profile import LayerProfile
from shoal.strategies.base import StepStats
from shoal.strategies.pipeline_meter import PipelineMeter, pipeline_figures
from shoal.training.build import total_steps
from shoal.training.faults import FAULT, kill_step, restart_time
from shoal.training.loop import checkpoint_due, is_due
from shoal.training.state import RunState


def test_total_steps_are_the_steps_given_or_whole_epochs_rounded_up():
    assert total_steps(load_config(None, ["train.steps=7"]), steps_per_epoch=100) == 7
    assert total_steps(load_config(None, ["train.epochs=2.5"]), steps_per_epoch=10) == 25
    assert total_steps(load_config(None, ["train.epochs=0.01"]), steps_per_epoch=10) == 1


def test_logging_and_evaluation_are_due_every_so_many_steps_and_at_the_last():
    assert [s for s in range(1, 13) if is_due(s, 5, last=12)] == [5, 10, 12]
    assert all(is_due(s, 1, last=12) for s in range(1, 13))


def test_checkpoints_in_the_loop_are_due_before_the_last_step_only():
    assert [s for s in range(1, 13) if checkpoint_due(s, 4, last=12)] == [4, 8]  # step 12's is written after
    assert not any(checkpoint_due(s, 0, last=12) for s in range(1, 13))  # 0: only at the end


def test_the_injected_kill_hits_its_rank_on_the_first_start_only():
    fault = FaultConfig(kill_rank=1, kill_step=3)
    assert kill_step(fault, 1, first_start=True) == 3
    assert kill_step(fault, 0, first_start=True) is None
    assert kill_step(fault, 1, first_start=False) is None  # after a restart, or when it rejoins
    assert kill_step(FaultConfig(), 0, first_start=True) is None  # no kill_rank: nobody dies


def test_counters_summed_over_workers_become_means_and_a_throughput():
    assert per_worker_means([40.0, 12.0, 3.0, 96.0], 4) == [10.0, 3.0, 0.75, 24.0]
    # Every worker's samples over the longest worker's clock, not rank 0's.
    assert samples_per_s(24.0, 4, longest_clock_s=2.0) == pytest.approx(48.0)
    assert samples_per_s(0.0, 4, longest_clock_s=0.0) == 0.0  # nothing trained: no division by zero


def _stats(samples=16, wire=100, dense=400, comm_s=0.5):
    return StepStats(loss=1.0, compute_s=0.1, comm_s=comm_s, wire_bytes=wire, dense_bytes=dense, samples=samples)


def test_run_state_counts_each_step():
    state = RunState()
    state.add(_stats(), step_s=0.25, wall=1.0)
    state.add(_stats(samples=8), step_s=0.5, wall=2.5)
    assert (state.step, state.clock, state.wall, state.samples) == (2, 0.75, 2.5, 24)
    assert (state.wire_bytes, state.dense_bytes, state.comm_s) == (200, 800, 1.0)


def test_time_to_target_is_the_training_clock_at_the_first_evaluation_that_reaches_it():
    state = RunState()
    for step_s, acc in [(1.0, 0.5), (1.0, 0.91), (1.0, 0.8), (1.0, 0.95)]:
        state.add(_stats(), step_s=step_s, wall=0.0)
        state.record_eval(acc, higher_is_better=True, target=0.9)
    assert (state.time_to_target, state.steps_to_target, state.best_metric, state.best_step) == (2.0, 2, 0.95, 4)
    untargeted = RunState()
    untargeted.record_eval(0.99, higher_is_better=True, target=None)
    assert untargeted.time_to_target is None and untargeted.best_metric == 0.99


def test_a_lower_is_better_target_is_reached_at_or_below_it():
    state = RunState()
    for mse in [0.5, 0.2, 0.3, 0.05]:
        state.add(_stats(), step_s=1.0, wall=0.0)
        state.record_eval(mse, higher_is_better=False, target=0.2)
    assert (state.steps_to_target, state.best_metric, state.best_step) == (2, 0.05, 4)


def test_run_state_round_trips_through_a_checkpoint_in_its_order():
    state = RunState()
    state.add(_stats(), step_s=0.25, wall=1.0)
    state.record_eval(0.7, higher_is_better=True, target=0.5)
    saved = state.state_dict()
    assert list(saved) == ["step", "clock", "wall", "wall_before", "samples", "wire_bytes", "dense_bytes",
                           "comm_s", "time_to_target", "steps_to_target", "resumed_from", "sparsity",
                           "best_metric", "best_step", "patience_best", "evals_without_improvement",
                           "stopped_early_at"]  # the checkpoint's "run" entry
    restored = RunState()
    restored.load(saved)
    assert restored.state_dict() == saved


def test_restart_time_is_measured_from_the_injected_kill(tmp_path):
    assert restart_time(tmp_path) is None  # no fault.json: no injected kill
    (tmp_path / FAULT).write_text(json.dumps({"rank": 1, "target": "worker", "time": time.time() - 3.0}))
    assert 3.0 <= restart_time(tmp_path) < 60.0
    (tmp_path / FAULT).write_text("{not json")
    assert restart_time(tmp_path) is None


def test_the_pipeline_meter_keeps_the_peak_of_chunks_in_flight():
    meter = PipelineMeter()
    for seconds, held in [(0.5, +1), (0.5, +1), (1.0, -1), (0.5, +1), (1.0, -1), (1.0, -1)]:
        meter.chunk(seconds, held)
    assert (meter.busy_s, meter.in_flight, meter.peak_in_flight) == (4.5, 0, 2)


def test_the_pipeline_meter_reports_the_steady_state_idle_share_past_the_first_step():
    meter = PipelineMeter()
    meter.chunk(3.0, +1)
    meter.step(pipeline_s=4.0, activation_bytes=100, memory_bytes=5_000, held_bytes=700)
    assert meter.figures()["idle"] == pytest.approx(1 - 3 / 4)  # one step: all of it
    meter.chunk(2.0, -1)
    meter.step(pipeline_s=3.0, activation_bytes=100, memory_bytes=4_000, held_bytes=900)
    assert meter.figures() == {
        "busy_s": pytest.approx(5 / 2), "pipeline_s": pytest.approx(7 / 2),
        "idle": pytest.approx(1 - 2 / 3),  # the first step (connecting the stages) left out
        "peak_in_flight": 1, "training_memory_bytes": 5_000, "held_parameter_bytes": 900, "activation_bytes": 200,
    }


def test_a_pipeline_meter_that_never_stepped_reports_zeros():
    assert PipelineMeter().figures() == {"busy_s": 0.0, "pipeline_s": 0.0, "idle": 0.0, "peak_in_flight": 0,
                                         "training_memory_bytes": 0, "held_parameter_bytes": 0,
                                         "activation_bytes": 0}


def _rank(busy_s, idle, peak_in_flight, memory=1_000, training=800, held=500, sent=1_200):
    return {"busy_s": busy_s, "pipeline_s": 4.0, "idle": idle, "peak_in_flight": peak_in_flight,
            "training_memory_bytes": training, "held_parameter_bytes": held, "activation_bytes": sent,
            "peak_memory_bytes": memory}


def _profiles(times, activations):
    return [LayerProfile(index=i, kind="Linear", time_s=t, param_bytes=0, activation_bytes=a)
            for i, (t, a) in enumerate(zip(times, activations))]


def test_pipeline_figures_take_stages_from_replica_0_and_memory_from_every_rank():
    # P=2 stages x D=2 replicas: ranks 0, 1 are replica 0's stages; ranks 2, 3 replica 1's.
    ranks = [_rank(1.0, 0.5, 2), _rank(3.0, 0.25, 1),
             _rank(9.0, 0.9, 9, memory=7_000, sent=2_000), _rank(9.0, 0.9, 9, training=900, held=600, sent=400)]
    bounds = [range(0, 2), range(2, 4)]
    profiles = _profiles([1.0, 1.0, 1.0, 3.0], [10, 20, 30, 40])
    figures = pipeline_figures(ranks, stages=2, virtual=1, microbatches=4, bounds=bounds, profiles=profiles,
                               model_parameter_bytes=1_234)
    assert list(figures) == ["stage_compute_s", "stage_imbalance", "predicted_stage_imbalance", "bubble_fraction",
                             "bubble_fraction_theory", "peak_memory_bytes", "training_memory_bytes",
                             "held_parameter_bytes", "model_parameter_bytes", "peak_activation_bytes",
                             "stage_peak_in_flight", "activation_bytes_per_worker"]  # summary.json's order
    assert figures["stage_compute_s"] == [1.0, 3.0] and figures["stage_imbalance"] == pytest.approx(3 / 2)
    assert figures["predicted_stage_imbalance"] == pytest.approx(imbalance([1, 1, 1, 3], bounds)) == 4 / 3
    assert figures["bubble_fraction"] == pytest.approx(0.375)
    assert figures["bubble_fraction_theory"] == pytest.approx(1 / 5)  # (P-1) / (V*M + P-1)
    assert (figures["peak_memory_bytes"], figures["training_memory_bytes"], figures["held_parameter_bytes"]) \
        == (7_000, 900, 600)
    assert figures["model_parameter_bytes"] == 1_234
    # A microbatch in flight keeps every layer's output of its stage: rank 0 holds 2 of 10 + 20 bytes, rank 1 one
    # of 30 + 40.
    assert figures["peak_activation_bytes"] == max(2 * (10 + 20), 1 * (30 + 40))
    assert figures["stage_peak_in_flight"] == [2, 1]
    assert figures["activation_bytes_per_worker"] == pytest.approx((1_200 + 1_200 + 2_000 + 400) / 4)


def test_interleaved_pipeline_figures_count_each_ranks_looped_stages():
    # P=2 ranks x V=2: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    ranks = [_rank(2.0, 0.2, 5), _rank(2.0, 0.4, 3)]
    bounds = [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    profiles = _profiles([1.0] * 4, [10, 20, 30, 40])
    figures = pipeline_figures(ranks, stages=2, virtual=2, microbatches=4, bounds=bounds, profiles=profiles,
                               model_parameter_bytes=0)
    assert figures["bubble_fraction_theory"] == pytest.approx(1 / (2 * 4 + 1))
    # In flight counts chunks of either stage: a chunk holds the mean of the rank's stages' activations.
    assert figures["peak_activation_bytes"] == pytest.approx(max(5 * (10 + 30) / 2, 3 * (20 + 40) / 2))
    assert figures["stage_imbalance"] == 1.0


def test_pipeline_figures_before_any_plan_or_compute_have_no_imbalance():
    ranks = [_rank(0.0, 0.0, 0), _rank(0.0, 0.0, 0)]
    figures = pipeline_figures(ranks, stages=2, virtual=1, microbatches=4, bounds=[], profiles=[],
                               model_parameter_bytes=0)
    assert figures["stage_imbalance"] is None and figures["predicted_stage_imbalance"] is None
    assert figures["peak_activation_bytes"] == 0
