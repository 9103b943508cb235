"""What a run leaves in OUT: metrics.jsonl, summary.json, curves.png, config.yaml, checkpoint.pt."""

import json

import pytest
from matplotlib.image import imread

import shoal
from shoal.config import load_config
from shoal.metrics.writer import read_metrics
from tests.conftest import small_config

STEPS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    cfg = small_config(out, train__steps=STEPS, train__eval_every=10, train__target_accuracy=0.5)
    return out, shoal.train(cfg)


@pytest.mark.processes
@pytest.mark.quick
def test_summary_json_has_the_documented_fields(run):
    out, summary = run
    data = json.loads((out / "summary.json").read_text())
    for key in (
        "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s", "wall_time_s", "steps",
        "workers", "strategy", "codec", "wire_bytes_per_worker", "dense_bytes_per_worker",
    ):
        assert key in data, key
    assert data == summary.model_dump()
    assert data["steps"] == STEPS and data["workers"] == 2 and data["strategy"] == "sync" and data["codec"] == "none"
    assert 0.5 < data["final_accuracy"] <= data["best_accuracy"] <= 1
    assert data["time_to_target_s"] is not None and 0 < data["time_to_target_s"] <= data["train_time_s"]


def test_wire_bytes_are_what_was_handed_to_all_reduce(run):
    out, summary = run
    # fp32 all-reduce of every gradient, every step: 4 bytes per parameter per step.
    assert summary.wire_bytes_per_worker == summary.parameters * 4 * STEPS
    assert summary.dense_bytes_per_worker == summary.wire_bytes_per_worker
    records = read_metrics(out / "metrics.jsonl")
    assert sum(r["wire_bytes"] for r in records) == summary.wire_bytes_per_worker


def test_metrics_jsonl_one_line_per_step_with_evaluations(run):
    out, _ = run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("time_s", "wall_s", "loss", "lr", "compute_s", "comm_s", "wire_bytes", "dense_bytes"):
            assert key in r, key
        assert r["comm_s"] >= 0 and r["compute_s"] >= 0
    times = [r["time_s"] for r in records]
    assert times == sorted(times)
    assert [r["step"] for r in records if "test_accuracy" in r] == [10, 20, 30, 40]


def test_curves_png_and_config_yaml(run):
    out, _ = run
    image = imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    saved = load_config(out / "config.yaml")
    assert saved.train.steps == STEPS and saved.model.name == "mlp"


@pytest.mark.processes
def test_stop_at_target_ends_early(tmp_path):
    cfg = small_config(tmp_path / "early", train__steps=400, train__eval_every=10)
    cfg["train"].update(target_accuracy=0.6, stop_at_target=True)
    summary = shoal.train(cfg)
    assert summary.steps < 400 and summary.steps == summary.steps_to_target
    assert summary.final_accuracy >= 0.6
