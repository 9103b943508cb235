"""Local SGD: averaging every step equals synchronous SGD; longer periods send less."""

import pytest
import torch

import shoal
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import small_config

STEPS = 40


def run(tmp_path, name, strategy, codec="none"):
    cfg = small_config(tmp_path / name, strategy=strategy, codec=codec, train__steps=STEPS, train__eval_every=STEPS)
    summary = shoal.train(cfg)
    return summary, load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


@pytest.mark.processes
def test_period_one_equals_synchronous_sgd(tmp_path):
    # Averaging models after each local step is averaging the updates, and SGD with
    # momentum is linear in the gradient: the two must agree.
    _, sync = run(tmp_path, "sync", "sync")
    summary, local = run(tmp_path, "local", "localsgd:period=1")
    assert summary.strategy == "localsgd"
    for name, tensor in sync.items():
        torch.testing.assert_close(local[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.processes
@pytest.mark.quick
def test_warmup_then_periodic_averaging_sends_what_it_should(tmp_path):
    summary, _ = run(tmp_path, "local", "localsgd:period=5,warmup=10")
    exchanges = 10 + (STEPS - 10) // 5  # every warm-up step, then one average per period
    assert summary.wire_bytes_per_worker == exchanges * summary.parameters * 4
    assert summary.final_accuracy > 0.6


@pytest.mark.processes
def test_compressed_deltas_with_error_feedback(tmp_path):
    summary, _ = run(tmp_path, "local", "localsgd:period=4", codec="topk:ratio=0.1,memory=ef")
    assert summary.wire_bytes_per_worker < summary.dense_bytes_per_worker / 3
    assert summary.final_accuracy > 0.6


@pytest.mark.processes
def test_hierarchical_with_every_average_global_equals_flat(tmp_path):
    # K = 1: each group average is replaced by a global one, so the groups must not matter.
    cfg = dict(workers=4, train__steps=STEPS, train__eval_every=STEPS)
    shoal.train(small_config(tmp_path / "flat", strategy="localsgd:period=4", **cfg))
    shoal.train(small_config(tmp_path / "hier", strategy="localsgd:period=4,group_size=2,global_period=1", **cfg))
    flat = load_checkpoint(tmp_path / "flat" / "checkpoint.pt")["model"]
    hier = load_checkpoint(tmp_path / "hier" / "checkpoint.pt")["model"]
    for name, tensor in flat.items():
        torch.testing.assert_close(hier[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.processes
def test_hierarchical_averages_in_groups_often_and_globally_rarely(tmp_path):
    cfg = small_config(tmp_path / "hier", workers=4, strategy="localsgd:period=2,group_size=2,global_period=5",
                       train__steps=STEPS, train__eval_every=STEPS)
    summary = shoal.train(cfg)
    per_average = summary.parameters * 4
    global_averages = STEPS // 10
    group_averages = STEPS // 2 - global_averages
    # Every average sends the whole flat model once per worker; groups of 2
    # exchange among themselves, global ones among all 4.
    assert summary.wire_bytes_per_worker == (group_averages + global_averages) * per_average
    assert summary.final_accuracy > 0.6


@pytest.mark.processes
def test_group_size_must_divide_the_workers(tmp_path):
    from shoal.launch import JobFailed

    cfg = small_config(tmp_path / "bad", workers=4, strategy="localsgd:period=2,group_size=3")
    with pytest.raises(JobFailed, match="group_size=3 does not divide the 4 workers"):
        shoal.train(cfg)
