"""The shipped examples run as the README says."""

import json

import pytest

from tests.conftest import ROOT, invoke_cli, run_cli


@pytest.mark.processes
def test_custom_model_and_dataset_entry_points_train_through_the_cli(tmp_path):
    out = tmp_path / "waves"
    # A fresh interpreter, as a user's: `shoal` puts the working directory, where waves.py is, on sys.path.
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
    result = invoke_cli("train", "examples/mnist1d.yaml", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["dataset"] == "mnist1d" and summary["model"] == "cnn1d"
    assert summary["final_accuracy"] >= 0.90
    assert summary["time_to_target_s"] is not None


@pytest.mark.processes
@pytest.mark.parametrize("strategy", ["sync", "localsgd:period=4"])
def test_the_language_model_example_lowers_perplexity(tmp_path, strategy):
    # examples/lm_stdlib.yaml as shipped, shortened: byte-level text of Python's own library.
    result = invoke_cli("train", "examples/lm_stdlib.yaml", "--out", str(tmp_path), "--set", f"strategy={strategy}",
                        "--set", "train.steps=60", "--set", "train.eval_every=20", "--set", "train.target=null")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["test_perplexity"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "test_perplexity" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "language_model" and summary["metric"] == "perplexity"
    assert summary["final_metric"] < 40  # from about 256 (a uniform guess over bytes)
