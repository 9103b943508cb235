"""`shoal bench comm --quick`: real runs on a shaped namespace testbed, with PyTorch's baselines."""

import json

import pytest
from matplotlib.image import imread

from shoal.netem import check_available
from tests.conftest import invoke_cli, run_cli

needs_testbed = pytest.mark.skipif(check_available() is not None, reason=str(check_available()))


@pytest.mark.netns
@pytest.mark.slow
@needs_testbed
def test_bench_comm_quick(tmp_path):
    result = run_cli("bench", "comm", "--workers", "2", "--rate", "100mbit", "--quick", "--out", str(tmp_path),
                     timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"ddp-fp32", "ddp-fp16-hook", "compute-only", "shoal-topk-ef", "shoal-auto"}
    for row in rows.values():
        assert not row["failed"] and row["rate"] == "100mbit"
        for key in ("label", "strategy", "codec", "time_to_target_s", "final_accuracy", "wire_bytes_per_worker", "steps_per_s"):
            assert key in row
    fp32, fp16, topk = rows["ddp-fp32"], rows["ddp-fp16-hook"], rows["shoal-topk-ef"]
    assert fp16["wire_bytes_per_step"] == pytest.approx(fp32["wire_bytes_per_step"] / 2)
    assert topk["wire_bytes_per_step"] < fp32["wire_bytes_per_step"] / 20
    assert rows["compute-only"]["wire_bytes_per_worker"] == 0
    # At 100 Mbit/s fp32 all-reduce of 185 k parameters (some 60 ms through tbf, whatever
    # the CPU does) is the slow part of a step; by how much depends on the machine's compute.
    assert topk["steps_per_s"] > fp32["steps_per_s"]
    assert fp32["time_to_target_s"] is not None and "ceiling_vs_ddp_fp32" in fp32
    # The link is 100 Mbit/s: auto must see that and compress (fp16 halves the transfer
    # whatever the compute), with the codec its own predictions rank first.
    auto = json.loads((tmp_path / "runs" / "100mbit" / "shoal-auto" / "summary.json").read_text())
    assert auto["codec_chosen"] not in (None, "none")
    assert auto["codec_chosen"] == min(auto["codec_auto"]["predictions"], key=lambda p: p["time_factor"])["spec"]
    assert rows["shoal-auto"]["wire_bytes_per_step"] < fp32["wire_bytes_per_step"]
    html = (tmp_path / "report.html").read_text()
    assert "ddp-powersgd" not in html and "shoal-topk-ef" in html and "accuracy-100mbit.png" in html
    assert imread(tmp_path / "accuracy-100mbit.png").shape[0] > 100
    assert imread(tmp_path / "bytes-per-step.png").shape[0] > 100


def test_medians_over_repetitions_count_a_miss_as_slowest():
    from shoal.bench.comm import medians

    def run(t, acc, k):
        return {"rate": "1gbit", "label": "x", "failed": False, "time_to_target_s": t, "final_accuracy": acc,
                "wire_bytes_per_worker": 10.0, "wire_bytes_per_step": 1.0, "steps": 100, "train_time_s": 5.0,
                "steps_per_s": 20.0, "median_step_s": 0.05, "metrics": f"m{k}", "repeat": k}

    (row,) = medians([run(30.0, 0.91, 0), run(None, 0.88, 1), run(20.0, 0.92, 2)])
    assert row["time_to_target_s"] == 30.0 and row["metrics"] == "m0"  # the median run's own curve
    assert row["final_accuracy"] == 0.91 and row["repeats"] == 3 and row["time_to_target_runs"] == [30.0, None, 20.0]
    (row,) = medians([run(None, 0.8, 0), run(None, 0.8, 1), run(20.0, 0.92, 2)])
    assert row["time_to_target_s"] is None
    failed = {"rate": "1gbit", "label": "x", "failed": True}
    (row,) = medians([failed, run(12.0, 0.9, 1)])
    assert row["failed_runs"] == 1 and row["time_to_target_s"] == 12.0


@pytest.mark.processes
@needs_testbed
def test_unknown_row_label_is_a_usage_error(tmp_path):
    result = invoke_cli("bench", "comm", "--rows", "ddp-fp32,nope", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "nope" in result.stderr and "shoal-auto" in result.stderr and "Traceback" not in result.stderr
