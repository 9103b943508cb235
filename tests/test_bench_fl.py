"""`shoal bench fl --quick`: the rows, their comparisons and the report, through the CLI."""

import json

from tests.conftest import run_cli


def test_bench_fl_quick(tmp_path):
    result = run_cli("bench", "fl", "--quick", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"centralised", "fedsgd", "fedavg-iid", "fedavg-topk"}
    for row in rows.values():
        for key in ("label", "alpha", "rounds_to_target", "final_accuracy", "uplink_bytes"):
            assert key in row
        assert row["alpha"] is None and 0 <= row["final_accuracy"] <= 1
    assert rows["centralised"]["uplink_bytes"] == 0 and rows["centralised"]["final_accuracy"] > 0.5
    assert rows["fedsgd"]["rounds"] == 3 * rows["fedavg-iid"]["rounds"]
    assert "rounds_vs_fedavg" in rows["fedsgd"] and "accuracy_vs_centralised" in rows["fedavg-iid"]
    topk = rows["fedavg-topk"]
    assert topk["uplink_bytes"] < rows["fedavg-iid"]["uplink_bytes"] / 4 and topk["uplink_reduction"] > 4
    assert (tmp_path / "report.html").is_file() and (tmp_path / "accuracy-iid.png").is_file()
    assert (tmp_path / "runs" / "fedavg-iid" / "metrics.jsonl").is_file()


def test_bench_fl_rejects_an_unknown_row_and_a_bad_bench_option(tmp_path):
    result = run_cli("bench", "fl", "--quick", "--rows", "fedavg-nope", "--out", str(tmp_path))
    assert result.returncode == 2 and "fedavg-nope" in result.stderr
    result = run_cli("bench", "fl", "--quick", "--set", "bench.fedprox=fedprox:mu=-1", "--out", str(tmp_path))
    assert result.returncode == 2 and "mu" in result.stderr
