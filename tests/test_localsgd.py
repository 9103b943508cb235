"""Local SGD: averaging every step equals synchronous SGD; longer periods send less."""

import torch

import shoal
from shoal.training.checkpoint import load_checkpoint
from tests.conftest import small_config

STEPS = 40


def run(tmp_path, name, strategy, codec="none"):
    cfg = small_config(tmp_path / name, strategy=strategy, codec=codec, train__steps=STEPS, train__eval_every=STEPS)
    summary = shoal.train(cfg)
    return summary, load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


def test_period_one_equals_synchronous_sgd(tmp_path):
    # Averaging models after each local step is averaging the updates, and SGD with
    # momentum is linear in the gradient: the two must agree.
    _, sync = run(tmp_path, "sync", "sync")
    summary, local = run(tmp_path, "local", "localsgd:period=1")
    assert summary.strategy == "localsgd"
    for name, tensor in sync.items():
        torch.testing.assert_close(local[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_warmup_then_periodic_averaging_sends_what_it_should(tmp_path):
    summary, _ = run(tmp_path, "local", "localsgd:period=5,warmup=10")
    exchanges = 10 + (STEPS - 10) // 5  # every warm-up step, then one average per period
    assert summary.wire_bytes_per_worker == exchanges * summary.parameters * 4
    assert summary.final_accuracy > 0.6


def test_compressed_deltas_with_error_feedback(tmp_path):
    summary, _ = run(tmp_path, "local", "localsgd:period=4", codec="topk:ratio=0.1,memory=ef")
    assert summary.wire_bytes_per_worker < summary.dense_bytes_per_worker / 3
    assert summary.final_accuracy > 0.6
