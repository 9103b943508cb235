"""Tasks: the loss and metrics a run trains and is judged by; targets, keep-best and early stopping
follow the task's main metric."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import shoal
from shoal.cli.components import registry_table
from shoal.config import ConfigError, EarlyStoppingConfig, load_config
from shoal.data import build_dataset
from shoal.engine.checkpoint import load_checkpoint
from shoal.engine.evaluate import evaluate, evaluate_task
from shoal.fl.config import load_fl_config
from shoal.metrics.report import summary_table
from shoal.metrics.writer import read_metrics
from shoal.registry import DATASETS, TASKS, load_builtins
from shoal.tasks import build_task, improves, reaches
from shoal.tasks.regression import Regression
from shoal.training.state import RunState
from tests.conftest import invoke_cli, small_config
from tests.test_cli import _render

CPU = torch.device("cpu")


def task(spec):
    load_builtins(TASKS)
    return build_task(TASKS.resolve(spec))


def _old_evaluate(model, dataset, *, batch_size):
    """The evaluation shoal ran before tasks, verbatim (one worker): the numbers classification must keep."""
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.tensors[0][start : start + batch_size], dataset.tensors[1][start : start + batch_size]
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == y).sum().double()
        totals[2] += len(y)
    loss, correct, count = totals.tolist()
    return loss / count, correct / count


# --- classification: the numbers of before ------------------------------------------------------

def test_classification_evaluates_to_exactly_the_numbers_of_before():
    load_builtins(DATASETS)
    data = build_dataset(DATASETS.resolve("digits"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        before = _old_evaluate(model, data.test, batch_size=100)
    metrics = evaluate_task(model, data.test, task("classification"), batch_size=100, device=CPU, rank=0,
                            world_size=1)
    assert list(metrics) == ["loss", "accuracy"]
    assert (metrics["loss"], metrics["accuracy"]) == before  # bit for bit
    assert evaluate(model, data.test, batch_size=100, device=CPU, rank=0, world_size=1) == before


def test_classifications_training_loss_is_cross_entropy():
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.equal(task("classification").loss(logits, y), F.cross_entropy(logits, y))


# --- regression and the language model, on random tensors -----------------------------------------

def test_regression_reports_mse_and_mae_and_matches_a_flat_target_to_its_outputs():
    outputs = torch.tensor([[1.0], [2.0], [4.0]])
    targets = torch.tensor([1.0, 0.0, 1.0])  # [B] against [B, 1]
    reg = task("regression")
    assert reg.loss(outputs, targets).item() == pytest.approx((0 + 4 + 9) / 3)
    sums = reg.batch_sums(outputs, targets)
    metrics = reg.metrics({k: float(v) for k, v in sums.items()})
    assert metrics == pytest.approx({"loss": 13 / 3, "mse": 13 / 3, "mae": 5 / 3})
    assert (Regression.main_metric, Regression.higher_is_better) == ("mse", False)
    with pytest.raises(ValueError, match=r"outputs \[3, 1\] and targets \[2\]"):
        reg.loss(outputs, targets[:2])


def test_language_model_is_token_cross_entropy_with_perplexity_and_token_accuracy():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    lm = task("language_model")
    token_loss = F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1))
    torch.testing.assert_close(lm.loss(logits, ids), token_loss)
    metrics = lm.metrics({k: float(v) for k, v in lm.batch_sums(logits, ids).items()})
    assert list(metrics) == ["loss", "perplexity", "token_accuracy"]
    assert metrics["loss"] == pytest.approx(token_loss.item())
    assert metrics["perplexity"] == pytest.approx(math.exp(token_loss.item()))
    assert metrics["token_accuracy"] == pytest.approx((logits.argmax(-1) == ids).float().mean().item())
    with pytest.raises(ValueError, match=r"logits \[B, T, V\] and token ids \[B, T\]"):
        lm.loss(logits, ids[:, :4])


def test_language_model_sums_split_over_batches_give_the_whole_and_skip_ignored_tokens():
    torch.manual_seed(1)
    logits, ids = torch.randn(4, 6, 11), torch.randint(0, 11, (4, 6))
    ids[0, :3] = -100  # padding
    lm = task("language_model")
    whole = lm.batch_sums(logits, ids)
    halves = [lm.batch_sums(logits[i : i + 2], ids[i : i + 2]) for i in (0, 2)]
    for name in lm.sum_names:
        assert float(whole[name]) == pytest.approx(sum(float(h[name]) for h in halves))
    assert whole["count"] == 21
    torch.testing.assert_close(lm.loss(logits, ids), F.cross_entropy(logits.reshape(-1, 11), ids.reshape(-1)))


def test_a_diverged_language_model_has_infinite_perplexity_not_an_overflow():
    lm = task("language_model")
    assert lm.metrics({"loss": 1e4, "nll": 1e4, "correct": 0.0, "count": 1.0})["perplexity"] == math.inf


# --- a user's loss and metrics --------------------------------------------------------------------

def test_a_users_loss_replaces_the_training_loss_and_the_reported_one():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    cls = task("classification:loss=tests.task_entry:doubled")
    torch.testing.assert_close(cls.loss(logits, y), 2 * F.cross_entropy(logits, y))
    metrics = cls.metrics({k: float(v) for k, v in cls.batch_sums(logits, y).items()})
    assert metrics["loss"] == pytest.approx(2 * F.cross_entropy(logits, y).item())
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_a_users_metrics_are_means_per_item_over_the_test_set():
    torch.manual_seed(2)
    x, y = torch.randn(50, 8), torch.randint(0, 8, (50,))
    model = nn.Identity()
    metrics = evaluate_task(model, TensorDataset(x, y), task("classification:metrics=tests.task_entry:top3"),
                            batch_size=16, device=CPU, rank=0, world_size=1)
    assert list(metrics) == ["loss", "accuracy", "top3"]
    expected = (x.topk(3, dim=1).indices == y[:, None]).any(dim=1).float().mean().item()
    assert metrics["top3"] == pytest.approx(expected) and metrics["top3"] >= metrics["accuracy"]


@pytest.mark.parametrize("fn, words", [
    ("tests.task_entry:clashing", r"\['accuracy'\] are the task's own names"),
    ("tests.task_entry:not_a_dict", "returned float, not a dict"),
])
def test_a_users_metrics_must_be_a_dict_of_new_names(fn, words):
    with pytest.raises((ValueError, TypeError), match=words):
        task(f"classification:metrics={fn}").batch_sums(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_a_whole_task_may_come_from_outside_shoal_and_must_be_a_task():
    cfg = load_config(None, ["task=tests.task_entry:MaeRegression:loss=tests.task_entry:focal", "train.target=0.1"])
    mae = build_task(cfg.task)
    assert (mae.main_metric, mae.higher_is_better, mae.options.loss) == ("mae", False, "tests.task_entry:focal")
    with pytest.raises(ConfigError, match="task: task entry point 'tests.task_entry:top3' must be a "
                                          "shoal.tasks.Task subclass"):
        load_config(None, ["task=tests.task_entry:top3"])


def test_synthetic_regression_has_float_targets_one_column_per_output():
    load_builtins(DATASETS)
    data = build_dataset(DATASETS.resolve("synthetic_regression:samples=100,test_samples=20,shape=[4],outputs=3"))
    x, y = data.train.tensors
    assert x.shape == (100, 4) and y.shape == (100, 3) and y.dtype == torch.float32
    assert len(data.test) == 20 and data.num_classes == 3  # the models' output width


# --- the main metric: improvement, target, early stopping -----------------------------------------

def test_an_improvement_beats_the_best_by_at_least_min_delta_in_the_metrics_direction():
    assert improves(0.5, None, higher_is_better=True) and not improves(math.nan, None, higher_is_better=True)
    assert improves(0.6, 0.5, higher_is_better=True) and not improves(0.5, 0.5, higher_is_better=True)
    assert improves(0.4, 0.5, higher_is_better=False) and not improves(0.6, 0.5, higher_is_better=False)
    assert not improves(0.55, 0.5, higher_is_better=True, min_delta=0.1)
    assert improves(0.3, 0.5, higher_is_better=False, min_delta=0.1)
    assert reaches(0.9, 0.9, higher_is_better=True) and reaches(0.1, 0.2, higher_is_better=False)
    assert not reaches(0.3, 0.2, higher_is_better=False)


def test_early_stopping_counts_evaluations_since_the_last_improvement_of_at_least_min_delta():
    state = RunState()
    rule = EarlyStoppingConfig(patience=2, min_delta=0.1)
    spent = []
    for mse in [1.0, 0.95, 0.7, 0.65, 0.62, 0.5]:  # 0.95, 0.65, 0.62: gains under 0.1 on the last big one
        state.add(_stats(), step_s=1.0, wall=0.0)
        state.record_eval(mse, higher_is_better=False, early_stopping=rule)
        spent.append(state.patience_spent(rule))
    assert spent == [False, False, False, False, True, False]
    assert (state.best_metric, state.best_step, state.patience_best) == (0.5, 6, 0.5)
    restored = RunState()
    restored.load(state.state_dict())
    assert restored.evals_without_improvement == 0 and restored.patience_best == 0.5


def _stats():
    from shoal.strategies.base import StepStats

    return StepStats(loss=1.0, compute_s=0.1, comm_s=0.0, wire_bytes=0, dense_bytes=0, samples=1)


# --- config -----------------------------------------------------------------------------------------

def test_the_task_defaults_to_classification_and_target_accuracy_is_its_target():
    cfg = load_config(None, ["train.target_accuracy=0.8"])
    assert cfg.task.name == "classification" and cfg.train.main_target == 0.8
    assert load_config(None, ["task=regression", "train.target=0.05"]).train.main_target == 0.05


@pytest.mark.parametrize("overrides, words", [
    (["task=regression", "train.target_accuracy=0.8"], "train.target_accuracy: task 'regression' measures no "
     "accuracy; give train.target for its main metric, mse \\(lower is better\\)"),
    (["train.target=1.5"], r"train.target: accuracy lies in \(0, 1\]; got 1.5"),
    (["task=language_model", "train.target=0.5"], r"perplexity lies in \(1, inf\)"),
    (["train.target=0.5", "train.target_accuracy=0.5"], "give train.target or train.target_accuracy, not both"),
    (["task=nope"], "task: unknown task 'nope'; allowed: classification, language_model, regression"),
    (["task=classification:loss=no_such_module_xyz:f"], "task: task 'classification': loss: entry point "
     "'no_such_module_xyz:f': cannot import"),
    (["task=classification:loss=tests.task_entry:one_argument"], "must take \\(outputs, targets\\)"),
    (["task=regression:gamma=2"], "task: task 'regression': gamma: Extra inputs"),
    (["train.early_stopping.patience=0"], "train.early_stopping.patience"),
])
def test_a_bad_task_or_target_is_a_config_error_naming_the_field(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


def test_a_federation_takes_classification_with_its_options_and_refuses_other_tasks():
    assert load_fl_config({"task": "classification:loss=tests.task_entry:focal"}).task.options.loss
    with pytest.raises(ConfigError, match="task: 'regression': a federation trains classification only"):
        load_fl_config({"task": "regression"})


def test_shoal_list_shows_the_tasks_with_their_options():
    load_builtins(TASKS)
    text = _render(registry_table(TASKS))
    for words in ("classification", "regression", "language_model", "loss=None", "ignore_index=-100"):
        assert words in text


def test_the_summary_table_names_the_main_metric():
    summary = {"out": "runs/r", "metric": "mse", "final_metric": 0.000123, "best_metric": 0.0001, "best_step": 40,
               "target": 0.05, "final_accuracy": None, "best_accuracy": None, "target_accuracy": None,
               "time_to_target_s": 1.5, "steps_to_target": 20, "steps": 60, "workers": 2, "strategy": "sync",
               "codec": "none", "model": "mlp", "parameters": 10, "train_time_s": 2.0, "wall_time_s": 3.0,
               "samples_per_s": 10.0, "wire_bytes_per_worker": 0, "dense_bytes_per_worker": 0,
               "stopped_early_at_step": 60, "best_checkpoint": "runs/r/best.pt"}
    text = _render(summary_table(summary))
    for words in ("final test mse", "0.000123", "best test mse", "(step 40)", "target mse", "0.0500",
                  "stopped early", "after step 60", "runs/r/best.pt"):
        assert words in text
    assert "accuracy" not in text


@pytest.mark.processes
def test_a_bad_task_spec_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("task: classification:loss=no_such_module_xyz:focal\ntrain: {steps: 1}\n")
    result = invoke_cli("train", str(cfg), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "task:" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- runs ---------------------------------------------------------------------------------------

REGRESSION = "synthetic_regression:samples=2048,test_samples=512,shape=[16]"


@pytest.mark.processes
def test_a_regression_run_lowers_its_mse_reaches_its_target_and_keeps_its_best_weights(tmp_path):
    out = tmp_path / "reg"
    cfg = small_config(out, task="regression", data={"dataset": REGRESSION, "batch_size": 16},
                       train={"steps": 60, "eval_every": 10, "target": 0.06, "keep_best": True})
    cfg["optimizer"]["lr"] = 0.05
    summary = shoal.train(cfg)

    evals = [r for r in read_metrics(out / "metrics.jsonl") if "test_mse" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    assert all(set(r) >= {"test_loss", "test_mse", "test_mae"} and "test_accuracy" not in r for r in evals)
    assert evals[-1]["test_mse"] < evals[0]["test_mse"] / 2
    assert (summary.task, summary.metric, summary.higher_is_better) == ("regression", "mse", False)
    assert summary.final_accuracy is None and summary.best_accuracy is None and summary.target_accuracy is None
    assert summary.final_metric == summary.final_metrics["mse"] == evals[-1]["test_mse"]
    assert summary.target == 0.06 and summary.steps_to_target is not None
    first = next(r for r in evals if r["test_mse"] <= 0.06)
    assert summary.steps_to_target == first["step"]
    best = min(evals, key=lambda r: r["test_mse"])
    assert (summary.best_metric, summary.best_step) == (best["test_mse"], best["step"])
    saved = load_checkpoint(out / "best.pt")
    assert (saved["step"], saved["metric"], saved["value"]) == (best["step"], "mse", best["test_mse"])
    assert set(saved["model"]) == set(load_checkpoint(out / "checkpoint.pt")["model"])
    assert json.loads((out / "summary.json").read_text())["best_checkpoint"] == str(out / "best.pt")


@pytest.mark.processes
def test_a_users_loss_is_the_one_the_workers_train_on(tmp_path):
    plain = small_config(tmp_path / "plain", train={"steps": 1, "eval_every": 1})
    doubled = small_config(tmp_path / "doubled", task="classification:loss=tests.task_entry:doubled,"
                           "metrics=tests.task_entry:top3", train={"steps": 1, "eval_every": 1})
    shoal.train(plain)
    summary = shoal.train(doubled)
    # The same first batch through the same initial weights: the step's loss is exactly twice.
    [a], [b] = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "doubled" / "metrics.jsonl")
    assert b["loss"] == pytest.approx(2 * a["loss"], rel=1e-6)
    assert "test_top3" in b and b["test_top3"] >= b["test_accuracy"]
    assert summary.task == "classification:loss=tests.task_entry:doubled,metrics=tests.task_entry:top3"


@pytest.mark.processes
def test_early_stopping_stops_survives_a_resume_and_a_stopped_run_stays_stopped(tmp_path):
    out = tmp_path / "early"
    # No gain of accuracy reaches 1.0: every evaluation after the first is one without improvement.
    rule = {"patience": 2, "min_delta": 1.0}

    def cfg(steps):
        return small_config(out, train={"steps": steps, "eval_every": 5, "early_stopping": rule})

    first = shoal.train(cfg(10))  # evaluations at 5 (the first best) and 10 (one without improvement)
    assert first.steps == 10 and first.stopped_early_at_step is None  # patience left when the run ended
    resumed = shoal.train(cfg(100), resume=True)
    # The count came back with the checkpoint: the evaluation at 15 is the second without improvement.
    # (Counted afresh, 15 would be a first best, and the run would stop at 25.)
    assert (resumed.resumed_from_step, resumed.steps, resumed.stopped_early_at_step) == (10, 15, 15)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "test_accuracy" in r] == [5, 10, 15]
    again = shoal.train(cfg(100), resume=True)
    assert (again.steps, again.stopped_early_at_step) == (15, 15)
    assert again.final_metric == resumed.final_metric
