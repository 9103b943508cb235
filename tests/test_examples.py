"""The shipped examples run as the README says."""

import json

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.processes
def test_custom_model_and_dataset_entry_points_train_through_the_cli(tmp_path):
    out = tmp_path / "waves"
    result = run_cli("train", "custom.yaml", "--set", "train.steps=150", "--out", str(out), cwd=ROOT / "examples" / "custom")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "waves:make_model" and summary["dataset"] == "waves:make_datasets"
    assert summary["workers"] == 2 and summary["final_accuracy"] > 0.8
    assert "final test accuracy" in result.stdout  # the summary table


@pytest.mark.slow
def test_demo_job_reaches_its_accuracy(tmp_path):
    """`make demo`'s job: 4 workers, 1-D CNN on MNIST-1D, test accuracy >= 0.90."""
    out = tmp_path / "demo"
    result = run_cli("train", "examples/mnist1d.yaml", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["dataset"] == "mnist1d" and summary["model"] == "cnn1d"
    assert summary["final_accuracy"] >= 0.90
    assert summary["time_to_target_s"] is not None
