"""`shoal bench fl --quick`: the rows, their comparisons and the report, through the CLI."""

import json

import pytest

from shoal.bench.comm import medians
from tests.conftest import invoke_cli, run_cli


@pytest.mark.processes
def test_bench_fl_quick(tmp_path):
    result = run_cli("bench", "fl", "--quick", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"centralised", "fedsgd", "fedavg-iid", "fedavg-topk", "fedavg-a0.5", "fedprox-a0.5"}
    for label, row in rows.items():
        for key in ("label", "alpha", "rounds_to_target", "final_accuracy", "uplink_bytes"):
            assert key in row
        assert row["alpha"] == (0.5 if label.endswith("a0.5") else None) and 0 <= row["final_accuracy"] <= 1
    assert rows["centralised"]["uplink_bytes"] == 0 and rows["centralised"]["final_accuracy"] > 0.5
    # The reference processed FedAvg's samples: rounds x clients a round x epochs (3, the workload's) x samples a client.
    central = json.loads((tmp_path / "runs" / "centralised" / "summary.json").read_text())
    train = 1797 - round(1797 * 0.2)  # digits, 20% test
    assert abs(central["samples"] - 10 * 5 * 3 * train / 10) <= 16  # up to one batch over
    # Skewed rows are compared with FedAvg on the same partition.
    assert rows["fedprox-a0.5"]["accuracy_vs_fedavg"] == (
        rows["fedprox-a0.5"]["final_accuracy"] - rows["fedavg-a0.5"]["final_accuracy"])
    assert rows["fedsgd"]["rounds"] == 3 * rows["fedavg-iid"]["rounds"]
    assert "rounds_vs_fedavg" in rows["fedsgd"] and "accuracy_vs_centralised" in rows["fedavg-iid"]
    topk = rows["fedavg-topk"]
    assert topk["uplink_bytes"] < rows["fedavg-iid"]["uplink_bytes"] / 4 and topk["uplink_reduction"] > 4
    assert (tmp_path / "report.html").is_file() and (tmp_path / "accuracy-iid.png").is_file()
    assert (tmp_path / "runs" / "fedavg-iid" / "metrics.jsonl").is_file()


@pytest.mark.processes
def test_bench_fl_rejects_an_unknown_row_and_a_bad_bench_option(tmp_path):
    result = invoke_cli("bench", "fl", "--quick", "--rows", "fedavg-nope", "--out", str(tmp_path))
    assert result.returncode == 2 and "fedavg-nope" in result.stderr
    result = invoke_cli("bench", "fl", "--quick", "--set", "bench.fedprox=fedprox:mu=-1", "--out", str(tmp_path))
    assert result.returncode == 2 and "mu" in result.stderr


def test_half_the_repeats_missing_the_target_makes_the_median_none():
    runs = [{"label": "a", "failed": False, "rounds_to_target": r, "final_accuracy": 0.9} for r in (25, None)]
    row, = medians(runs, ("final_accuracy",), group_by=("label",), target="rounds_to_target")
    assert row["rounds_to_target"] is None and row["rounds_to_target_runs"] == [25, None]
    runs.append({"label": "a", "failed": False, "rounds_to_target": 30, "final_accuracy": 0.8})
    row, = medians(runs, ("final_accuracy",), group_by=("label",), target="rounds_to_target")
    assert row["rounds_to_target"] == 30 and row["final_accuracy"] == 0.9
