"""`shoal bench comm --quick`: real runs on a shaped namespace testbed, with PyTorch's baselines."""

import json

import pytest
from matplotlib.image import imread

from shoal.netem import check_available
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(check_available() is not None, reason=str(check_available())),
]


def test_bench_comm_quick(tmp_path):
    result = run_cli("bench", "comm", "--workers", "2", "--rate", "100mbit", "--quick", "--out", str(tmp_path),
                     timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {"ddp-fp32", "ddp-fp16-hook", "compute-only", "shoal-topk-ef"}
    for row in rows.values():
        assert not row["failed"] and row["rate"] == "100mbit"
        for key in ("label", "strategy", "codec", "time_to_target_s", "final_accuracy", "wire_bytes_per_worker", "steps_per_s"):
            assert key in row
    fp32, fp16, topk = rows["ddp-fp32"], rows["ddp-fp16-hook"], rows["shoal-topk-ef"]
    assert fp16["wire_bytes_per_step"] == pytest.approx(fp32["wire_bytes_per_step"] / 2)
    assert topk["wire_bytes_per_step"] < fp32["wire_bytes_per_step"] / 20
    assert rows["compute-only"]["wire_bytes_per_worker"] == 0
    # At 100 Mbit/s fp32 all-reduce of 185 k parameters is the slow part of a step.
    assert topk["steps_per_s"] > 2 * fp32["steps_per_s"]
    assert fp32["time_to_target_s"] is not None and "ceiling_vs_ddp_fp32" in fp32
    html = (tmp_path / "report.html").read_text()
    assert "ddp-powersgd" not in html and "shoal-topk-ef" in html and "accuracy-100mbit.png" in html
    assert imread(tmp_path / "accuracy-100mbit.png").shape[0] > 100
    assert imread(tmp_path / "bytes-per-step.png").shape[0] > 100
