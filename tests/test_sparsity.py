"""Sparse training (prune:): global magnitude masks, Zhu & Gupta's schedule,
fine-tuning from a checkpoint, and only the kept weights' gradients on the wire."""

import pytest
import torch
from torch import nn

import shoal
from shoal.comm.memory import ErrorFeedback
from shoal.engine.checkpoint import WrongModel, load_checkpoint, load_weights, save_checkpoint
from shoal.engine.sparsity import (PruneConfig, SparsityController, cubic_sparsity, global_magnitude_masks,
                                     prunable_weights)
from tests.conftest import invoke_cli, small_config
from tests.test_pipeline import MODEL, assert_same_weights


def test_global_masks_prune_the_smallest_magnitudes_over_all_layers_together():
    a = torch.tensor([[0.1, -5.0], [0.2, 3.0]])
    b = torch.tensor([-0.05, 4.0, 0.3, -0.15])
    masks = global_magnitude_masks([a, b], 0.5)
    # The four smallest of all eight: 0.05, 0.1, 0.15, 0.2 (three of them in b's and a's small entries).
    assert masks[0].tolist() == [[False, True], [False, True]]
    assert masks[1].tolist() == [False, True, True, False]
    assert sum(int((~m).sum()) for m in masks) == 4
    weights = [torch.randn(50, 20), torch.randn(7, 3, 5)]
    for sparsity in (0.1, 0.9, 0.95):
        masks = global_magnitude_masks(weights, sparsity)
        pruned = torch.cat([w[~m].abs() for w, m in zip(weights, masks)])
        kept = torch.cat([w[m].abs() for w, m in zip(weights, masks)])
        assert pruned.numel() == round(sparsity * 1105) and pruned.max() <= kept.min()


class _Recorder:
    """A strategy's side of the masks (shoal.strategies.base.Strategy), recording what it is asked."""

    def __init__(self, holds: bool):
        self.holds, self.calls = holds, []

    def use_masks(self, masks):
        self.calls.append("use_masks")

    def holds_masks(self):
        return self.holds

    def before_ranking(self):
        self.calls.append("before_ranking")

    def masks_changed(self, masks):
        self.calls.append(("masks_changed", masks.version))


def test_the_controller_asks_the_strategy_before_ranking_and_tells_it_of_new_masks():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    holder = _Recorder(holds=True)
    controller = SparsityController(PruneConfig(sparsity=0.5, schedule="oneshot"), model, 100, strategy=holder)

    assert controller.update(0)
    assert holder.calls == ["use_masks", "before_ranking", ("masks_changed", 1)]
    # A worker whose masks another process enforces neither ranks nor prunes.
    follower = _Recorder(holds=False)
    other = SparsityController(PruneConfig(sparsity=0.5, schedule="oneshot"), model, 100, strategy=follower)
    assert not other.update(0) and follower.calls == ["use_masks"] and other.masks == {}


def test_the_cubic_schedule_and_when_masks_change():
    assert cubic_sparsity(0, 0.9, 0, 100) == 0.0 and cubic_sparsity(100, 0.9, 0, 100) == 0.9
    assert cubic_sparsity(50, 0.9, 0, 100) == pytest.approx(0.9 * (1 - 0.5**3))
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2))
    assert [tuple(w.shape) for w in prunable_weights(model)] == [(10, 10), (2, 1, 3)]  # no biases, no norms
    gradual = SparsityController(PruneConfig(sparsity=0.8, begin_step=10, end_step=50, every=10), model, 100)
    targets = {step: gradual.target(step) for step in range(0, 60)}
    assert targets[5] == 0.0 and targets[50] == 0.8
    assert targets[20] == pytest.approx(0.8 * (1 - 0.75**3))
    gradual.sparsity = targets[20]
    assert gradual.target(25) == targets[20]  # between updates: held
    oneshot = SparsityController(PruneConfig(sparsity=0.5, schedule="oneshot", begin_step=3), model, 100)
    assert [oneshot.target(s) for s in (0, 2, 3, 99)] == [0.0, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="end_step 5 must come after begin_step 10"):
        PruneConfig(sparsity=0.5, begin_step=10, end_step=5)


def test_error_feedback_follows_a_bucket_to_its_new_packing():
    memory = ErrorFeedback()
    memory.residuals[0] = torch.arange(6.0)  # dense bucket of 6
    memory.repack(0, None, torch.tensor([1, 3, 4, 5]), 6)
    assert memory.residuals[0].tolist() == [1.0, 3.0, 4.0, 5.0]
    memory.repack(0, torch.tensor([1, 3, 4, 5]), torch.tensor([3, 5]), 6)  # 1 and 4 pruned as well
    assert memory.residuals[0].tolist() == [3.0, 5.0]
    memory.repack(0, torch.tensor([0, 1, 2]), torch.tensor([0]), 6)  # a residual of another layout: stale
    assert 0 not in memory.residuals


def _weights(run):
    return load_checkpoint(run / "checkpoint.pt")["model"]


@pytest.mark.processes
def test_fine_tuning_with_fixed_masks_sends_only_the_kept_gradients(tmp_path):
    dense = shoal.train(small_config(tmp_path / "dense", train__steps=60, train__eval_every=60))
    pruned = shoal.train(small_config(
        tmp_path / "pruned", train__steps=40, train__eval_every=40, train__init_from=str(tmp_path / "dense"),
        prune={"sparsity": 0.8, "schedule": "oneshot"}))
    weights = _weights(tmp_path / "pruned")
    w = weights["net.0.weight"] if "net.0.weight" in weights else next(v for k, v in weights.items()
                                                                       if k.endswith("weight") and v.dim() == 2)
    assert pruned.sparsity == pytest.approx(0.8, abs=0.005) and pruned.sparsity_target == 0.8
    assert (w == 0).float().mean() > 0.5  # the zeros are really in the checkpoint
    # The masks were fixed: the weights pruned at step 0 of fine-tuning are still zero at its end, and
    # they were the smallest of the dense model's.
    start = _weights(tmp_path / "dense")
    prunable = [k for k, v in weights.items() if k.endswith("weight") and v.dim() >= 2]
    expected = global_magnitude_masks([start[k] for k in prunable], 0.8)
    for key, keep in zip(prunable, expected):
        assert torch.all(weights[key][~keep] == 0), key
    # Only the kept 20% of the prunable weights' gradients (plus the dense biases) were sent.
    assert pruned.wire_bytes_per_worker < 0.3 * pruned.dense_bytes_per_worker
    assert pruned.final_accuracy > 0.8 and pruned.final_accuracy > dense.final_accuracy - 0.1


@pytest.mark.processes
def test_gradual_pruning_with_a_lossy_codec_and_error_feedback(tmp_path):
    summary = shoal.train(small_config(tmp_path / "run", train__steps=40, train__eval_every=40,
                                       codec="topk:ratio=0.3,memory=ef",
                                       prune={"sparsity": 0.6, "begin_step": 5, "end_step": 25, "every": 5}))
    assert summary.sparsity == pytest.approx(0.6, abs=0.005)
    assert summary.final_accuracy > 0.5


def test_fine_tuning_from_another_model_fails_clearly(tmp_path):
    # What a worker runs first under train.init_from (shoal.training.loop): the same check, in-process.
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": nn.Sequential(nn.Linear(4, 8)).state_dict()})
    with pytest.raises(WrongModel, match=r"another model: 0.weight is \[8, 4\] there, \[16, 4\] here"):
        load_weights(nn.Sequential(nn.Linear(4, 16)), tmp_path)
    with pytest.raises(WrongModel, match="1.weight missing"):
        load_weights(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), tmp_path / "checkpoint.pt")
    model = nn.Sequential(nn.Linear(4, 8))
    load_weights(model, tmp_path)
    assert torch.equal(model[0].weight, load_checkpoint(tmp_path / "checkpoint.pt")["model"]["0.weight"])


@pytest.mark.processes
@pytest.mark.parametrize("flag, message", [
    ("prune.sparsity=1.5", "prune.sparsity: Input should be less than 1"),
    ("train.init_from=/no/such/run", "no checkpoint there"),
])
def test_bad_prune_settings_exit_2(tmp_path, flag, message):
    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 2}\nprune: {sparsity: 0.5}\n")
    result = invoke_cli("train", str(config), "--set", flag)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_resumed_run_takes_its_masks_from_the_zeros_it_restored():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.zero_()[0, :3] = 1.0  # more exact zeros than half the weights: ties a ranking would break
    controller = SparsityController(PruneConfig(sparsity=0.5, schedule="oneshot"), model, 100)
    controller.restore(0.5)
    assert controller.sparsity == 0.5 and controller.version == 1
    assert torch.equal(controller.mask_of(model[0].weight), model[0].weight != 0)
    assert torch.all(controller.mask_of(model[1].weight))  # its weights are non-zero: all kept


def test_a_residual_saved_packed_survives_the_resumed_packing():
    memory = ErrorFeedback()
    memory.residuals[0] = torch.tensor([1.0, 2.0])  # saved after packing to entries 1 and 3 of 4
    memory.repack(0, None, torch.tensor([1, 3]), 4)
    assert memory.residuals[0].tolist() == [1.0, 2.0]


@pytest.mark.processes
def test_parameter_servers_hold_the_masks_rank_0_chose(tmp_path):
    # The dense model's smallest 80% are pruned at step 0 of fine-tuning and stay zero on the
    # servers, whichever worker's pushes land in between.
    dense = shoal.train(small_config(tmp_path / "dense", workers=1, train__steps=60, train__eval_every=60))
    pruned = shoal.train(small_config(
        tmp_path / "pruned", strategy="async_ps:servers=2", train__steps=30, train__eval_every=30,
        optimizer={"name": "sgd", "lr": 0.02, "momentum": 0.9},  # two workers' pushes on one momentum
        train__init_from=str(tmp_path / "dense"), prune={"sparsity": 0.8, "schedule": "oneshot"}))
    start, weights = _weights(tmp_path / "dense"), _weights(tmp_path / "pruned")
    prunable = [k for k, v in weights.items() if k.endswith("weight") and v.dim() >= 2]
    for key, keep in zip(prunable, global_magnitude_masks([start[k] for k in prunable], 0.8)):
        assert torch.all(weights[key][~keep] == 0), key
        assert (weights[key][keep] != start[key][keep]).float().mean() > 0.9, key  # the kept ones trained on
    assert pruned.sparsity == pytest.approx(0.8, abs=0.005)
    # The servers fine-tuned the dense model (train.init_from), not a fresh one.
    assert pruned.final_accuracy > dense.final_accuracy - 0.05, (pruned.final_accuracy, dense.final_accuracy)
    # Pushes and replies carry the kept 20% of the weights (and the dense biases, and the mask once).
    assert pruned.wire_bytes_per_worker < 0.3 * pruned.dense_bytes_per_worker


@pytest.mark.processes
def test_gradual_pruning_on_parameter_servers_packs_by_each_new_mask(tmp_path):
    # Masks change every 5 of rank 0's steps while the other worker pushes by the one it last heard of;
    # top-k's error feedback follows each new packing; no push is dropped for an unknown mask.
    summary = shoal.train(small_config(
        tmp_path / "run", strategy="ssp:staleness=1,servers=2", train__steps=40, train__eval_every=40,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, codec="topk:ratio=0.5,memory=ef",
        prune={"sparsity": 0.7, "begin_step": 0, "end_step": 25, "every": 5}))
    weights = _weights(tmp_path / "run")
    prunable = [v for k, v in weights.items() if k.endswith("weight") and v.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in prunable) / sum(w.numel() for w in prunable)
    assert summary.sparsity == pytest.approx(0.7, abs=0.005) and zeros == pytest.approx(0.7, abs=0.005)
    assert summary.wire_bytes_per_worker < 0.5 * summary.dense_bytes_per_worker
    assert summary.dropped_pushes == 0 and summary.final_accuracy > 0.5


@pytest.mark.processes
def test_two_sparse_workers_end_where_one_worker_with_their_batch_ends(tmp_path):
    # Packed buckets carry the mean gradient of the kept weights: 2 workers x 16 samples give
    # the weights 1 worker x 32 gets, masks and all.
    common = dict(train__steps=30, train__eval_every=30, prune={"sparsity": 0.6, "begin_step": 0, "end_step": 20,
                                                                "every": 5})
    shoal.train(small_config(tmp_path / "one", workers=1, data={"dataset": "digits", "batch_size": 32}, **common))
    shoal.train(small_config(tmp_path / "two", workers=2, **common))
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.processes
def test_a_gradually_pruned_hybrid_pipeline_trains_as_sparse_data_parallel(tmp_path):
    # Two stages x two replicas against two-worker data parallel. The first 5 steps are dense (the
    # cubic schedule starts at 0): the replicas average whole gradients. Then every mask update
    # ranks the whole model (the stages' weights gathered from their ranks), an evaluation in
    # between gives the released weights back, and a stage's replicas average the kept weights'
    # gradients only: the weights two-worker sparse data parallel ends with.
    common = dict(model=MODEL, train__steps=30, train__eval_every=15,
                  prune={"sparsity": 0.7, "begin_step": 0, "end_step": 20, "every": 5})
    dp = shoal.train(small_config(tmp_path / "dp", workers=2, **common))
    hybrid = shoal.train(small_config(tmp_path / "hybrid", workers=4, strategy="pipeline:stages=2,microbatches=2,dp=2",
                                      **common))
    assert_same_weights(tmp_path / "dp", tmp_path / "hybrid")
    assert hybrid.final_accuracy == pytest.approx(dp.final_accuracy, abs=0.01)
    assert hybrid.sparsity == pytest.approx(0.7, abs=0.005)
    assert 0 < hybrid.held_parameter_bytes < hybrid.model_parameter_bytes
    activations = hybrid.activation_bytes_per_worker  # the rest is the replicas' gradient average
    assert hybrid.wire_bytes_per_worker - activations < 0.6 * (hybrid.dense_bytes_per_worker - activations)


@pytest.mark.processes
def test_a_sparse_run_with_error_feedback_killed_and_restarted_ends_as_the_unbroken_one(tmp_path):
    # The masks come back from the checkpoint's zeros, the residuals by parameter: DDP orders a
    # bucket one way in its first step and another after, so a residual kept by bucket position
    # landed on other weights after a restart (and after every run's first step).
    def config(out, **fault):
        return small_config(out, train__steps=40, train__eval_every=40, train__checkpoint_every=20,
                            codec="topk:ratio=0.3,memory=ef", fault=fault,
                            prune={"sparsity": 0.6, "begin_step": 0, "end_step": 30, "every": 5})

    shoal.train(config(tmp_path / "unbroken"))
    broken = shoal.train(config(tmp_path / "broken", kill_rank=1, kill_step=30), max_restarts=1)
    assert broken.restarts == 1 and broken.resumed_from_step == 20
    assert_same_weights(tmp_path / "unbroken", tmp_path / "broken")


def test_a_restore_with_fewer_zeros_than_its_masks_prunes_again_zeros_first():
    # Parameter servers restored from a shard checkpoint older than the last mask update.
    model = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 101.0).view(10, 10))
        model[0].weight.view(-1)[[5, 50, 95]] = 0.0  # 3% zero, the masks in force pruned 40%
    controller = SparsityController(PruneConfig(sparsity=0.4, schedule="oneshot"), model, 100)
    controller.restore(0.4)
    w = model[0].weight.view(-1)
    assert set((w == 0).nonzero().view(-1).tolist()) == set(range(38)) | {50, 95}  # 40: the 3 zeros, the 37 smallest
