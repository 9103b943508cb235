"""PyTorch's own DDP paths as baselines: same results as shoal where they should be, bytes counted."""

import pytest
import torch

import shoal
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import small_config

STEPS = 30


def run(tmp_path, name, strategy):
    cfg = small_config(tmp_path / name, strategy=strategy, train__steps=STEPS, train__eval_every=STEPS)
    return shoal.train(cfg), load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


@pytest.mark.processes
def test_builtin_ddp_equals_shoal_sync_and_counts_every_gradient(tmp_path):
    base, base_weights = run(tmp_path, "ddp", "ddp")
    ours, our_weights = run(tmp_path, "sync", "sync")
    for name, tensor in base_weights.items():
        torch.testing.assert_close(our_weights[name], tensor, rtol=0, atol=0, msg=name)
    assert base.wire_bytes_per_worker == ours.wire_bytes_per_worker == base.parameters * 4 * STEPS


@pytest.mark.processes
def test_pytorch_hooks_are_metered(tmp_path):
    fp16, _ = run(tmp_path, "fp16", "ddp:hook=fp16")
    assert fp16.wire_bytes_per_worker == fp16.parameters * 2 * STEPS
    power, _ = run(tmp_path, "power", "ddp:hook=powersgd,rank=1,start_iter=10")
    # 10 exact steps, then rank-1 factors: far fewer bytes than 30 exact steps.
    assert fp16.parameters * 4 * 10 < power.wire_bytes_per_worker < fp16.parameters * 4 * 12


@pytest.mark.processes
@pytest.mark.quick
def test_compute_only_sends_nothing(tmp_path):
    local, _ = run(tmp_path, "local", "ddp:hook=local")
    assert local.wire_bytes_per_worker == 0 and local.dense_bytes_per_worker == 0
