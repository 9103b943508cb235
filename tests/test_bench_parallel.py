"""`shoal bench parallel --quick`: pipelines on a shaped namespace testbed, checked against the planner."""

import json

import pytest

from shoal.netem import check_available
from tests.conftest import run_cli


@pytest.mark.netns
@pytest.mark.slow
def test_bench_parallel_quick(tmp_path):
    if check_available() is not None:
        pytest.skip(check_available())
    result = run_cli("bench", "parallel", "--quick", "--rate", "1gbit", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"pp2-equal-1f1b", "pp2-auto-1f1b"}
    for row in rows.values():
        assert row["measured"] and not row["failed"] and row["rate"] == "1gbit"
        for key in ("samples_per_s", "bubble_fraction", "bubble_fraction_theory", "stage_imbalance",
                    "peak_memory_bytes", "predicted_step_s", "measured_step_s"):
            assert row[key] is not None and row[key] >= 0, key
        assert row["bubble_fraction_theory"] == pytest.approx(1 / 9)  # P=2, M=8
    # The automatic partition cuts between the two wide layers; the equal one after half the layers.
    assert rows["pp2-auto-1f1b"]["partition"] != rows["pp2-equal-1f1b"]["partition"]
    assert "throughput_vs_equal" in rows["pp2-auto-1f1b"]
    assert "planner: median |predicted - measured|" in result.stdout


def test_bench_parallel_rejects_an_unknown_layout(tmp_path):
    result = run_cli("bench", "parallel", "--rows", "pp9", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown label pp9" in result.stderr
