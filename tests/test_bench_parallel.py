"""`shoal bench parallel --quick`: pipelines on a shaped namespace testbed, checked against the planner."""

import json

import pytest

from shoal.netem import check_available
from tests.conftest import invoke_cli, run_cli


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


@pytest.mark.processes
def test_bench_parallel_rejects_an_unknown_layout(tmp_path):
    result = invoke_cli("bench", "parallel", "--rows", "pp9", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown label pp9" in result.stderr


def test_rows_are_compared_within_their_workload_and_a_predicted_tie_is_no_pick():
    from shoal.bench.parallel import FULL_ROWS, _compare, summarize

    bubble = [row for row in FULL_ROWS if row.label.startswith("bubble-")]
    assert bubble and all(not row.capped and any(o.startswith("model=") for o in row.workload) for row in bubble)

    def row(label, workload, measured, predicted, activations=None):
        return {"label": label, "rate": "none", "workload": workload, "measured": True, "samples_per_s": 64 / measured,
                "measured_step_s": measured, "predicted_step_s": predicted, "peak_activation_bytes": activations,
                "prediction_error": abs(predicted - measured) / measured}

    results = [
        row("pp2-equal-1f1b", "main", 0.090, 0.090), row("pp2-auto-1f1b", "main", 0.063, 0.051, 100),
        row("pp2-auto-gpipe", "main", 0.072, 0.051, 400),
        # Same prediction for both schedules: GPipe measured a little faster, which is no ranking error.
        row("bubble-1f1b", "coarse", 1.09, 1.05, 100), row("bubble-gpipe", "coarse", 1.06, 1.05, 400),
    ]
    _compare(results)
    by = {r["label"]: r for r in results}
    assert by["pp2-auto-1f1b"]["throughput_vs_equal"] == pytest.approx(0.090 / 0.063)
    assert by["pp2-auto-1f1b"]["activation_memory_vs_gpipe"] == 0.25
    assert by["bubble-1f1b"]["activation_memory_vs_gpipe"] == 0.25 and "throughput_vs_equal" not in by["bubble-1f1b"]
    summary = summarize(results)
    assert summary["cases"] == 2 and summary["cases_ranked_right"] == 2
    results[0]["measured_step_s"] = 0.050  # the equal split measured fastest, predicted slowest: a miss
    _compare(results)
    assert summarize(results)["cases_ranked_right"] == 1
