"""``shoal bench fl --flower``: Flower's simulation on shoal's own work, beside ``shoal fl simulate``."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from shoal.bench import flower_fl, flower_secagg
from shoal.cli import app

FLOWER = flower_secagg.available()
TINY = ["data.dataset=digits", "data.batch_size=16", "model=mlp:hidden=[32]", "optimizer.lr=0.1",
        "fl.clients=6", "fl.clients_per_round=3", "fl.rounds=8", "fl.target_accuracy=0.5", "fl.processes=1"]


def test_flower_missing_exits_2_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(flower_secagg, "available", lambda: flower_secagg.INSTALL_HINT)
    result = CliRunner().invoke(app, ["bench", "fl", "--flower", "--out", str(tmp_path)])
    assert result.exit_code == 2 and 'Flower is not installed: pip install -e ".[bench-flower]"' in result.stderr


def test_tree_memory_counts_a_child_and_its_child(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)']); " \
           "time.sleep(5)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while flower_fl.tree_memory(parent.pid)[1] < 2:
            assert time.monotonic() < deadline, "the grandchild never showed"
            time.sleep(0.05)
        pss, count = flower_fl.tree_memory(parent.pid)
        assert count == 2 and pss > 1_000_000  # two Python interpreters
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.processes
@pytest.mark.skipif(FLOWER is not None, reason=FLOWER or "")
def test_flower_and_shoal_train_the_same_work_to_the_target(tmp_path):
    result = CliRunner().invoke(app, ["bench", "fl", "--flower", "--config", "examples/fl_mnist1d.yaml",
                                      "--out", str(tmp_path), *(a for o in TINY for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    shoal, flower = json.loads((tmp_path / "bench.json").read_text())
    assert (shoal["label"], flower["label"]) == ("shoal", "flower")
    for row in (shoal, flower):
        assert not row["failed"] and 1 <= row["rounds_to_target"] <= 8 and row["time_to_target_s"] > 0
    assert flower["processes"] > shoal["processes"]  # Ray's raylet, GCS and actors beside the driver
    assert shoal["speedup_vs_flower"] > 0 and shoal["memory_vs_flower"] > 0
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "flower-0" / "flower-rounds.jsonl").read_text()
              .splitlines()]
    assert rounds[-1]["test_accuracy"] >= 0.5 and rounds[-1]["round"] == flower["rounds_to_target"]
