"""Sample-level DP-SGD in ``shoal train``: per-example gradients, clipping, one global step's
noise, Poisson sampling, the budget as a hard limit, and the ledger across a restart, in real
gloo worker processes through the CLI."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from conftest import invoke_cli, small_config
from shoal.config import load_config
from shoal.data.poisson import PoissonBatches
from shoal.privacy.accountant import Ledger, epsilon
from shoal.privacy.dp_sgd import DpSgd, DpSgdOptions, check_model, clip_and_sum, per_example_gradients, plan, sampling
from shoal.training.loop import _budget_spent

CE = nn.functional.cross_entropy


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 3))


def test_per_example_gradients_are_those_of_one_backward_per_example():
    model, x, y = _model(), torch.randn(6, 1, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    grads, losses = per_example_gradients(model, CE, x, y)
    for i in range(len(y)):
        model.zero_grad()
        loss = CE(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_each_example_is_clipped_to_the_norm_and_small_ones_pass_unchanged():
    grads = {"w": torch.tensor([[3.0, 0.0], [0.3, 0.4], [0.0, 0.0]]), "b": torch.tensor([[4.0], [0.0], [0.0]])}
    sums, norms = clip_and_sum(grads, clip=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5, 0.0])
    # Example 0 (norm 5) scaled to norm 1: (0.6, 0, 0.8); example 1 (norm 0.5) as it is.
    assert sums["w"].tolist() == pytest.approx([0.6 + 0.3, 0.4], abs=1e-5)
    assert sums["b"].tolist() == pytest.approx([0.8], abs=1e-5)


def test_batchnorm_is_refused_naming_the_layer_and_the_fix():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"layer '1' is BatchNorm1d.*GroupNorm"):
        check_model(model, "model test")
    check_model(nn.Sequential(nn.Conv1d(1, 4, 3), nn.GroupNorm(2, 4)))  # allowed


def _mechanism(rank, *, noise=2.0, clip=0.5, expected=6.0):
    options = DpSgdOptions(noise_multiplier=noise, clip=clip, reproducible_noise=True)
    found = plan(options, sampling_rate=expected / 600, examples=600, steps=10)
    return DpSgd(options, plan=found, rank=rank, seed=rank)


def test_only_rank_zero_adds_noise_of_std_noise_multiplier_times_clip_over_the_expected_batch():
    model, x, y = _model(), torch.randn(6, 1, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    sums, _ = clip_and_sum(per_example_gradients(model, CE, x, y)[0], 0.5)
    _mechanism(1).gradients(model, CE, x, y)  # rank 1: the clipped sum over the expected batch, no noise
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sums[name] / 6.0, rtol=1e-5, atol=1e-7)
    clean = {name: p.grad.clone() for name, p in model.named_parameters()}
    noises = []
    rank0 = _mechanism(0)
    for _ in range(20):
        rank0.gradients(model, CE, x, y, chunks=2)  # chunked: the same sum
        noises.append(torch.cat([(p.grad - clean[name]).flatten() for name, p in model.named_parameters()]))
    measured = torch.cat(noises).std().item()
    assert measured == pytest.approx(2.0 * 0.5 / 6.0, rel=0.05)  # sigma * C / expected batch


def test_poisson_batches_sample_each_example_at_the_rate_from_disjoint_shares():
    data = torch.utils.data.TensorDataset(torch.arange(1000.0).unsqueeze(1), torch.zeros(1000, dtype=torch.long))
    workers = [PoissonBatches(data, rank=r, world_size=2, rate=0.05, steps_per_epoch=20, layout_seed=3, seed=7)
               for r in range(2)]
    shares = [set(w.share.tolist()) for w in workers]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 1000
    stream = workers[0].iterate()
    sizes = [len(next(stream)[1]) for _ in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(0.05 * 500, rel=0.05)
    assert torch.tensor(sizes, dtype=torch.float).var().item() == pytest.approx(500 * 0.05 * 0.95, rel=0.25)
    # Seeded: step k is the same draw whether the run went straight there or resumed at k.
    straight = workers[0].iterate()
    for _ in range(5):
        next(straight)
    assert torch.equal(next(straight)[0], next(workers[0].iterate(start_step=5))[0])
    # Unseeded (the default): nobody who knows the config can replay the batches.
    a, b = (PoissonBatches(data, rank=0, world_size=1, rate=0.5, steps_per_epoch=2, layout_seed=3, seed=None)
            for _ in range(2))
    assert not torch.equal(next(a.iterate())[0], next(b.iterate())[0])
    empty = PoissonBatches(data, rank=0, world_size=1, rate=1e-9, steps_per_epoch=1, layout_seed=3, seed=1)
    x, y = next(empty.iterate())
    assert x.shape == (0, 1) and y.shape == (0,)  # nobody drawn: the step still runs, on nothing


def test_sampling_rate_and_plan_follow_the_workers_shares():
    assert sampling(1000, 2, 25) == (0.05, 1000, 20)
    with pytest.raises(ValueError, match="data.batch_size: 600 expected examples a step exceed the 500"):
        sampling(1000, 2, 600)
    calibrated = plan(DpSgdOptions(target_epsilon=3.0), sampling_rate=0.05, examples=1000, steps=200)
    assert calibrated.calibrated and calibrated.epsilon <= 3.0
    assert calibrated.epsilon == pytest.approx(epsilon(calibrated.noise_multiplier, 0.05, 200, 1e-5))
    with pytest.raises(ValueError, match=r"privacy.target_epsilon: .* would spend epsilon"):
        plan(DpSgdOptions(noise_multiplier=0.5, target_epsilon=1.0), sampling_rate=0.05, examples=1000, steps=200)


def test_a_ledger_counts_steps_known_to_fit_without_composing_each_one():
    ledger = Ledger(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5, target_epsilon=2.0)
    assert not ledger.would_exceed(100)  # one composition for the planned run
    ledger._epsilon_at.clear()
    for _ in range(100):
        ledger.record(1)
    assert ledger.steps == 100 and not ledger._epsilon_at  # nothing composed on the way
    assert ledger.spent() == pytest.approx(epsilon(1.0, 0.01, 100, 1e-5))


def test_the_loop_stops_before_the_step_that_would_pass_the_budget():
    mechanism = DpSgd(DpSgdOptions(noise_multiplier=1.0, target_epsilon=6.0), rank=0, seed=0,
                      plan=plan(DpSgdOptions(noise_multiplier=1.0), sampling_rate=0.5, examples=100, steps=1))
    notes = []
    run = SimpleNamespace(privacy=mechanism, is_main=True)
    progress = SimpleNamespace(note=notes.append)
    while not _budget_spent(run, progress):
        mechanism.ledger.record(1)
    ledger = mechanism.ledger
    assert ledger.steps > 1 and ledger.spent() <= 6.0 < epsilon(1.0, 0.5, ledger.steps + 1, 1e-5)
    assert mechanism.stopped_by_budget and mechanism.report()["stopped_by_budget"]
    assert f"step {ledger.steps + 1} would take epsilon past target_epsilon=6" in notes[0]


def _config(tmp_path, name, **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path / name, **changes)))
    return path


@pytest.mark.parametrize("setting, message", [
    ("privacy=dp_sgd", "privacy: dp_sgd needs noise_multiplier= or target_epsilon="),
    ("privacy=dp_sgd:noise_multiplier=0.01", "noise_multiplier"),
    ("strategy=localsgd", "privacy: dp_sgd runs under strategy sync"),
    ("codec=topk", "codec: 'topk"),
    ("train.clip_grad_norm=1.0", "train.clip_grad_norm"),
])
def test_a_config_dp_sgd_cannot_honour_exits_2_naming_the_field(setting, message):
    overrides = [] if setting.startswith("privacy=") else ["privacy=dp_sgd:noise_multiplier=1"]
    with pytest.raises(ValueError, match=message):
        load_config(None, [*overrides, setting])


@pytest.mark.processes
@pytest.mark.parametrize("setting, message", [
    ("model=resnet", r"privacy: dp_sgd cannot train model resnet.*BatchNorm.*GroupNorm"),
    ("privacy=dp_sgd:noise_multiplier=0.5,target_epsilon=0.5",
     r"privacy.target_epsilon: 40 steps at noise_multiplier 0.5 .* would spend epsilon \d"),
])
def test_shoal_train_refuses_before_any_worker_starts(tmp_path, setting, message):
    config = _config(tmp_path, "refused")
    result = invoke_cli("train", str(config), "--set", "privacy=dp_sgd:noise_multiplier=1", "--set", setting)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert __import__("re").search(message, " ".join(result.stderr.split())), result.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()


@pytest.mark.processes
def test_two_workers_add_one_global_steps_noise_and_report_the_spend(tmp_path):
    # One step of plain SGD at lr 1 moves each weight by minus its gradient: with a noise
    # multiplier of 20 the noise dwarfs the clipped signal, so the step's spread is the noise's.
    config = _config(tmp_path, "noise", optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0},
                     train={"steps": 1, "eval_every": 1})
    result = invoke_cli("train", str(config), "--set", "privacy=dp_sgd:noise_multiplier=20,clip=0.1")
    assert result.returncode == 0, result.stderr
    assert "privacy: DP-SGD, clip 0.1, noise 20, Poisson sampling q=" in result.stdout
    cfg = load_config(config)
    from shoal.data import build_dataset
    from shoal.models import build_model

    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(cfg.seed)
    start = build_model(cfg.model, data)
    after = build_model(cfg.model, data)
    from shoal.engine.checkpoint import load_weights

    load_weights(after, tmp_path / "noise")
    moved = torch.cat([(a - b).flatten() for a, b in zip(after.parameters(), start.parameters())])
    expected_batch = 2 * 16  # q x the examples of both shares: batch_size per worker x 2 workers
    once = 20 * 0.1 / expected_batch
    assert moved.std().item() == pytest.approx(once, rel=0.08)  # twice the noise would be 1.41x this
    summary = json.loads((tmp_path / "noise" / "summary.json").read_text())["privacy"]
    assert summary["mechanism"] == "dp_sgd" and summary["sampler"] == "poisson" and summary["steps"] == 1
    assert summary["expected_batch"] == pytest.approx(expected_batch) and summary["noise_multiplier"] == 20
    assert summary["epsilon"] == pytest.approx(epsilon(20, summary["sampling_rate"], 1, 1e-5))
    last = json.loads((tmp_path / "noise" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epsilon"] == pytest.approx(summary["epsilon"])


@pytest.mark.slow
@pytest.mark.processes
def test_a_killed_worker_restarts_from_the_checkpoint_and_the_ledger_neither_resets_nor_double_counts(tmp_path):
    config = _config(tmp_path, "killed", train={"steps": 40, "eval_every": 20, "checkpoint_every": 20})
    result = invoke_cli("train", str(config), "--set", "privacy=dp_sgd:target_epsilon=4,clip=1",
                        "--kill", "1:30", "--max-restarts", "1")
    assert result.returncode == 0, result.stderr
    assert "(calibrated)" in result.stdout
    run = tmp_path / "killed"
    saved = yaml.safe_load((run / "config.yaml").read_text())["privacy"]
    sigma = saved["noise_multiplier"]  # calibrated once, written into the run's config
    summary = json.loads((run / "summary.json").read_text())
    privacy = summary["privacy"]
    assert summary["restarts"] == 1 and privacy["steps"] == 40  # 20 + 20, not 20 + 30 nor 20
    assert privacy["noise_multiplier"] == sigma
    assert privacy["epsilon"] == pytest.approx(epsilon(sigma, privacy["sampling_rate"], 40, 1e-5))
    assert privacy["epsilon"] <= 4.0
    # Going on past what the budget was calibrated for is refused before any worker starts.
    more = invoke_cli("train", "--resume", str(run), "--set", "train.steps=80")
    assert more.returncode == 2, more.stderr
    assert "privacy.target_epsilon: 80 steps" in " ".join(more.stderr.split())
