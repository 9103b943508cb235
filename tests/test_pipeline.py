"""Pipeline parallelism: partitioning maths, and real gloo pipelines that train
exactly as one process would on the same batches."""

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import shoal
from shoal.config import ConfigError
from shoal.launch import JobFailed
from shoal.models.transformer import TinyTransformer, TransformerOptions
from shoal.parallel.plan import in_flight
from shoal.parallel.partition import NoFeasibleSplit, equal_split, imbalance, min_max_split
from shoal.parallel import profile, split_points
from shoal.metrics.probe import kept_state
from shoal.parallel.profile import profile_layers, sequential_layers
from shoal.parallel.split_points import export_pipe, profile_segments, split_candidates
from shoal.strategies.pipeline import PipelineStrategy
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import invoke_cli, small_config


def brute_force(weights, parts, sizes=None, cap=None):
    n, best = len(weights), None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        edges = [0, *cuts, n]
        runs = [range(a, b) for a, b in zip(edges, edges[1:])]
        if sizes is not None and any(sum(sizes[i] for i in r) > cap for r in runs):
            continue
        heaviest = max(sum(weights[i] for i in r) for r in runs)
        best = heaviest if best is None else min(best, heaviest)
    return best


def test_min_max_split_is_optimal_with_and_without_a_cap():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        parts = rng.randint(1, n)
        weights = [rng.uniform(0.1, 10) for _ in range(n)]
        sizes = [rng.uniform(1, 5) for _ in range(n)]
        cap = rng.uniform(3, 20)
        split = min_max_split(weights, parts)
        assert [i for r in split for i in r] == list(range(n)) and all(len(r) for r in split)
        assert max(sum(weights[i] for i in r) for r in split) == pytest.approx(brute_force(weights, parts))
        expected = brute_force(weights, parts, sizes, cap)
        if expected is None:
            with pytest.raises(NoFeasibleSplit):
                min_max_split(weights, parts, sizes=sizes, cap=cap)
        else:
            capped = min_max_split(weights, parts, sizes=sizes, cap=cap)
            assert all(sum(sizes[i] for i in r) <= cap for r in capped)
            assert max(sum(weights[i] for i in r) for r in capped) == pytest.approx(expected)


def test_equal_split_and_imbalance():
    assert equal_split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    weights = [8, 1, 1, 1, 1, 1, 1, 1]
    assert imbalance(weights, equal_split(8, 2)) == pytest.approx(11 / 7.5)
    assert imbalance(weights, min_max_split(weights, 2)) == pytest.approx(8 / 7.5)


def test_layers_are_profiled_in_order_on_their_real_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))
    layers = sequential_layers(model)
    assert [type(m).__name__ for m in layers] == ["Flatten", "Linear", "ReLU", "Linear"]
    profiles = profile_layers(layers, torch.randn(8, 1, 64), repeats=2)
    assert [p.activation_bytes for p in profiles] == [8 * 64 * 4, 8 * 32 * 4, 8 * 32 * 4, 8 * 10 * 4]
    assert profiles[1].param_bytes == (64 * 32 + 32) * 4 and profiles[2].param_bytes == 0
    assert all(p.time_s > 0 for p in profiles)
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no gradients behind
    with pytest.raises(ValueError, match="layer sequence"):
        sequential_layers(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_measuring_leaves_running_statistics_and_the_random_streams_as_they_were(device):
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5)).to(device)
    x = torch.randn(8, 4, device=device)
    cpu, accelerator = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device == "cuda" else None
    with kept_state([model], x):
        model(x)
        torch.rand(3, device=device)
    torch.testing.assert_close(model[0].running_mean, torch.zeros(4, device=device))
    assert int(model[0].num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), cpu)
    if accelerator is not None:  # profiling on one rank must not move its GPU stream away from the others'
        assert torch.equal(torch.cuda.get_rng_state(device), accelerator)


def assert_same_weights(a, b):
    wa, wb = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


MODEL = "mlp:hidden=[64, 32, 32]"
TWO_STAGE = dict(model=MODEL, train__steps=30, train__eval_every=15)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of TWO_STAGE that every two-stage schedule is compared with."""
    out = tmp_path_factory.mktemp("one")
    shoal.train(small_config(out, workers=1, **TWO_STAGE))
    return out


@pytest.mark.processes
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_two_stage_pipeline_trains_exactly_as_one_process(tmp_path, schedule, one_process):
    # M equal microbatches of a batch: the mean of their mean losses is the batch's mean loss.
    summary = shoal.train(small_config(tmp_path / "pp", workers=2,
                                       strategy=f"pipeline:stages=2,microbatches=4,schedule={schedule}", **TWO_STAGE))
    assert_same_weights(one_process, tmp_path / "pp")
    assert len(summary.partition) == 2 and summary.partition[0][0] == 0 and summary.partition[-1][1] == 8
    assert summary.bubble_fraction_theory == pytest.approx(1 / 5)
    assert 0 < summary.bubble_fraction < 1 and summary.stage_imbalance >= 1
    assert summary.activation_bytes_per_worker > 0 and summary.peak_activation_bytes > 0
    # Each rank trained holding its own stage's parameters only (an evaluation at step 15 gave
    # the others back for a while; the weights above show they came back right).
    assert 0 < summary.held_parameter_bytes < summary.model_parameter_bytes
    assert summary.training_memory_bytes > 0


@pytest.mark.processes
def test_a_pipeline_trains_on_the_tasks_loss_exactly_as_one_process(tmp_path):
    # The schedule calls the task's loss per microbatch: regression's mse, a mean per microbatch.
    common = dict(model=MODEL, task="regression", train__steps=20, train__eval_every=10,
                  data={"dataset": "synthetic_regression:samples=512,test_samples=128,shape=[16]", "batch_size": 16})
    one = shoal.train(small_config(tmp_path / "one", workers=1, **common))
    summary = shoal.train(small_config(tmp_path / "pp", workers=2, strategy="pipeline:stages=2,microbatches=4",
                                       **common))
    assert_same_weights(tmp_path / "one", tmp_path / "pp")
    assert summary.metric == "mse" and summary.final_metric == pytest.approx(one.final_metric, rel=1e-4)


@pytest.mark.processes
def test_interleaved_1f1b_holds_two_stages_per_rank_and_trains_exactly_as_one_process(tmp_path):
    common = dict(model=MODEL, train__steps=20, train__eval_every=20)
    shoal.train(small_config(tmp_path / "one", workers=1, **common))
    summary = shoal.train(small_config(tmp_path / "pp", workers=2, strategy="pipeline:stages=2,microbatches=4,"
                                       "schedule=interleaved,virtual=2", **common))
    assert_same_weights(tmp_path / "one", tmp_path / "pp")
    assert len(summary.partition) == 4  # 2 ranks x 2 stages, rank r holding stages r and r + 2
    assert summary.bubble_fraction_theory == pytest.approx(1 / (2 * 4 + 1))
    # Rank 0 warms up with (V-1)P + 2(P-1) chunk forwards and holds one more: V*P + P - 1 = 5, the
    # count the planner's memory estimate takes (3 microbatches per chunk, rounded up from 5 / 2).
    assert summary.stage_peak_in_flight[0] == 5 and summary.stage_peak_in_flight[1] <= 5
    assert in_flight("interleaved", 4, 2, 2) == 3 and in_flight("1f1b", 4, 2) == 2


@pytest.mark.processes
@pytest.mark.parametrize("strategy, words", [
    ("pipeline:stages=3", "strategy: pipeline: stages=3 x dp=1 needs 3 workers; the job has 2"),
    ("pipeline:stages=2,microbatches=5", "microbatches=5 must divide the batch of 16 (data.batch_size)"),
])
def test_pipelines_the_config_shows_impossible_exit_2_before_any_process_starts(tmp_path, strategy, words):
    config = tmp_path / "c.yaml"
    config.write_text(f"workers: 2\ndata: {{dataset: digits, batch_size: 16}}\nstrategy: '{strategy}'\n")
    result = invoke_cli("train", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="needs|must divide"):  # the Python API checks the same
        shoal.train(small_config(tmp_path / "api", strategy=strategy))


@pytest.mark.processes
@pytest.mark.parametrize("model, strategy, words", [
    (MODEL, "pipeline:stages=2,max_memory_per_worker=1KiB", "max_memory_per_worker=1.0KiB"),
    ("transformer:d_model=16,heads=2,layers=1,ff=32", "pipeline:stages=2,schedule=interleaved,virtual=8",
     "16 stages but TinyTransformer splits into at most 5 (a stage begins at a submodule with parameters that "
     "forward calls once, at a cut PyTorch's stages can run"),  # 8 candidates, 3 of them merged (residuals)
])
def test_impossible_pipelines_fail_with_a_clear_error(tmp_path, model, strategy, words):
    with pytest.raises(JobFailed, match="pipeline"):
        try:
            shoal.train(small_config(tmp_path / "run", model=model, strategy=strategy, train__steps=2))
        except JobFailed as err:
            assert any(words in f.message for f in err.failures), [f.message for f in err.failures]
            raise


def test_a_plan_from_an_older_checkpoint_is_resumed_with_no_segments():
    strategy = SimpleNamespace(S=2, _saved_plan=None)  # load_state_dict reads only the stage count
    PipelineStrategy.load_state_dict(strategy, {"plan": ([(0, 3), (3, 8)], [])})  # saved before segments existed
    assert strategy._saved_plan == ([(0, 3), (3, 8)], [], None)
    PipelineStrategy.load_state_dict(strategy, {"plan": ([(0, 8)], [], None)})  # another stage count: re-partitioned
    assert strategy._saved_plan == ([(0, 3), (3, 8)], [], None)


TRANSFORMER = "transformer:d_model=16,heads=2,layers=2,ff=32"


@pytest.mark.processes
def test_a_transformer_is_cut_before_its_encoder_layers():
    torch.manual_seed(0)
    model = TinyTransformer(TransformerOptions(d_model=16, heads=2, layers=2, ff=32), (1, 8, 8), 10)
    sample = torch.randn(4, 1, 8, 8)
    assert split_candidates(model, sample, 2) == ["embed", "encoder.layers.0", "encoder.layers.1", "norm", "head"]
    names, profiles = profile_segments(model, sample, 2, repeats=1)
    assert names == ["embed", "encoder.layers.0", "encoder.layers.1", "norm", "head"]
    assert profiles[0].param_bytes == (16 + 16 + 64 * 16) * 4  # the embedding and the model's own position table
    assert [p.activation_bytes for p in profiles] == [4 * 64 * 16 * 4] * 2 + [4 * 16 * 4] * 2 + [4 * 10 * 4]
    assert all(p.grad is None for p in model.parameters()) and "forward" not in model.encoder.layers[1].__dict__
    # Four stages need cuts inside the layers: none may make a residual skip a stage.
    names, _ = profile_segments(model, sample, 4, repeats=1)
    assert names == ["embed", "encoder.layers.0.norm1", "encoder.layers.0.norm2", "encoder.layers.1.norm1",
                     "encoder.layers.1.norm2", "norm", "head"]


def test_tracing_leaves_the_split_points_own_attributes_as_they_were():
    model = TinyTransformer(TransformerOptions(d_model=16, heads=2, layers=2, ff=32), (1, 8, 8), 10)
    layer, norm = model.encoder.layers[1], model.norm
    wrapped = layer.forward  # as another tool's wrapper would keep it
    vars(layer)["_orig_forward"] = wrapped
    export_pipe(model, torch.randn(4, 1, 8, 8), ["encoder.layers.1", "norm"])
    assert vars(layer)["_orig_forward"] is wrapped and "forward" not in vars(layer)
    assert "_orig_forward" not in vars(norm) and "forward" not in vars(norm)


def test_segment_profiling_that_fails_leaves_no_gradients_behind(monkeypatch):
    model = TinyTransformer(TransformerOptions(d_model=16, heads=2, layers=1, ff=32), (1, 8, 8), 10)
    sample = torch.randn(4, 1, 8, 8)
    timed = []

    def fails_after_timing(fn, args, repeats):
        timed.append(profile.time_forward_backward(fn, args, repeats))  # its backward has run
        raise RuntimeError("out of memory")

    monkeypatch.setattr(split_points, "time_forward_backward", fails_after_timing)
    with pytest.raises(RuntimeError, match="out of memory"):
        profile_segments(model, sample, 2, repeats=1)
    assert timed and all(p.grad is None for p in model.parameters())


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)) * 2


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 10)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(h if h.sum() > 0 else -h)  # a branch on values: no single graph


def test_models_that_cannot_be_split_fail_with_a_clear_error():
    sample = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="pipeline: 2 stages but OneLinear splits into at most 1"):
        profile_segments(OneLinear(), sample, 2)
    model = DataDependent()
    with pytest.raises(ValueError, match="pipeline: torch.export cannot trace DataDependent"):
        profile_segments(model, sample, 2)
    assert "forward" not in model.b.__dict__  # the model is left as it was


@pytest.mark.processes
def test_a_model_that_is_not_a_layer_sequence_trains_through_export_exactly_as_one_process(tmp_path):
    # 2 ranks x 2 interleaved stages: 4 stages of 2 encoder layers, cut inside the layers around their residuals.
    common = dict(model=TRANSFORMER, train__steps=20, train__eval_every=10)
    shoal.train(small_config(tmp_path / "one", workers=1, **common))
    summary = shoal.train(small_config(tmp_path / "pp", workers=2,
                                       strategy="pipeline:stages=2,microbatches=4,schedule=interleaved", **common))
    assert_same_weights(tmp_path / "one", tmp_path / "pp")
    assert len(summary.partition) == 4 == len(summary.split_points) + 1
    assert summary.partition[0][0] == 0 and summary.activation_bytes_per_worker > 0
