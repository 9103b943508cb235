"""What `shoal train` checks and says in its own process, before and around its workers."""

import json
import time

import pytest
import yaml

from conftest import ROOT, invoke_cli, small_config

pytestmark = pytest.mark.processes


def _train(tmp_path, cfg, *extra):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return invoke_cli("train", str(path), *extra, cwd=ROOT / "tests")


def test_a_model_that_does_not_fit_the_data_is_a_config_error_before_any_worker(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = _train(tmp_path, small_config(out, model="failing_entry:make_wrong_width_model"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "does not fit dataset digits (samples of shape (1, 8, 8)" in lines[0] and "40x10" in lines[0]
    assert not (out / "metrics.jsonl").exists()  # no worker started
    assert time.monotonic() - started < 60


def test_the_command_says_what_it_starts_and_resume_says_what_it_changes(tmp_path):
    out = tmp_path / "out"
    cfg = small_config(out, train__steps=30, schedule={"name": "cosine"})
    first = _train(tmp_path, cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "shoal: training mlp on digits, 2 workers (sync) -> " in first.stdout

    again = invoke_cli("train", "--resume", str(out))  # finished: nothing to do, and it says so
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished at step 30 of train.steps=30: nothing to train" in " ".join(again.stdout.split())
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] is None  # nothing ran

    longer = invoke_cli("train", "--resume", str(out), "--set", "train.steps=60")
    assert longer.returncode == 0, longer.stderr[-2000:]
    note = " ".join(longer.stderr.split())
    assert "train.steps 30 -> 60: the cosine schedule now spans 60 steps" in note
    assert "from 0.0002739 at step 30 to 0.05 at step 31" in note  # lr 0.1: the old cosine's end, the new one's middle
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 30 and summary["steps"] == 60
    walls = [r["wall_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "wall_s" in r]
    assert walls == sorted(walls)  # the resumed session's wall clock goes on from the first's
