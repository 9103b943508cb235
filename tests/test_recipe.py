"""Mixed precision, gradient accumulation and clipping (train.precision / accumulate / clip_grad_norm)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shoal
from conftest import small_config
from shoal import ConfigError, load_config
from shoal.config import check_job, check_recipe
from shoal.engine.recipe import StepRecipe


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(12, 8), torch.randint(0, 3, (12,))


def _grads(recipe):
    model, x, y = _model_and_batch()
    loss = recipe.gradients(lambda a, b: F.cross_entropy(model(a), b), x, y)
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_give_the_whole_batchs_gradient_and_loss():
    loss, whole = _grads(StepRecipe())
    for parts in (2, 3, 5):  # 5 does not divide 12: unequal micro-batches, weighted by size
        loss_n, split = _grads(StepRecipe(accumulate=parts))
        assert torch.allclose(loss_n, loss, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(split, whole))


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_fp32_gradients():
    model, x, y = _model_and_batch()
    recipe = StepRecipe(precision="bf16")
    seen = []
    loss = recipe.gradients(lambda a, b: (seen.append(model(a).dtype), F.cross_entropy(model(a), b))[1], x, y)
    assert seen == [torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(loss.item() - _grads(StepRecipe())[0].item()) < 0.05


def test_clipping_bounds_the_global_norm_before_the_step():
    model, x, y = _model_and_batch()
    recipe = StepRecipe(clip_grad_norm=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe.gradients(lambda a, b: F.cross_entropy(model(a), b), x, y)
    before = [p.detach().clone() for p in model.parameters()]
    recipe.step(opt, model.parameters())
    assert recipe.last_norm > 0.01
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.1 * 0.01, rel=1e-3)  # lr x the clipped norm


def test_strategies_that_cannot_honour_the_recipe_are_refused_before_any_worker(tmp_path):
    base = small_config(tmp_path)
    with pytest.raises(ConfigError, match="train.accumulate: PipelineStrategy cannot honour it"):
        check_job(load_config({**base, "strategy": "pipeline:stages=2", "train": {"accumulate": 2}}), 2)
    with pytest.raises(ConfigError, match="fp16 \\(a gradient scaler\\) needs CUDA"):
        check_job(load_config({**base, "train": {"precision": "fp16"}}), 2)
    ps = load_config({**base, "strategy": "async_ps"}).strategy.target
    with pytest.raises(ValueError, match="fp16 needs an optimizer step in the worker"):
        check_recipe(load_config({**base, "train": {"precision": "fp16"}}).train, ps, cuda=True)
    check_job(load_config({**base, "train": {"precision": "bf16", "accumulate": 2, "clip_grad_norm": 1.0}}), 2)


@pytest.mark.processes
def test_accumulation_under_sync_ends_at_the_same_weights_as_without(tmp_path):
    from shoal.engine.checkpoint import load_checkpoint

    plain = shoal.train(small_config(tmp_path / "plain", train__steps=20))
    split = shoal.train(small_config(tmp_path / "split", train__steps=20, train__accumulate=4))
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert split.final_accuracy == pytest.approx(plain.final_accuracy, abs=0.01)
    # One all-reduce a step, as without accumulation: the first three micro-batches ran in no_sync.
    assert split.wire_bytes_per_worker == plain.wire_bytes_per_worker


@pytest.mark.processes
@pytest.mark.parametrize("strategy", ["sync", "localsgd:period=4", "async_ps"])
def test_bf16_with_clipping_trains_under_each_kind_of_strategy(tmp_path, strategy):
    summary = shoal.train(small_config(tmp_path / "run", strategy=strategy, train__steps=80,
                                       train__precision="bf16", train__clip_grad_norm=1.0))
    assert summary.final_accuracy > 0.6
