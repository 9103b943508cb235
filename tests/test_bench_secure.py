"""``shoal bench secure``: SecAgg+'s cost rows, measured against plain aggregation in the same run."""

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.processes
def test_the_quick_bench_measures_each_row_and_its_uplink_is_below_fp32(tmp_path):
    done = run_cli("bench", "secure", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {"secagg-n6-drop0", "secagg-n6-drop30", "secagg-n10-drop0", "secagg-n10-drop30"}
    for row in rows.values():
        # value_bits 16 + ceil(log2 n) bits a value, against 32: 0.61x at n = 6, 0.65x at n = 10 (with header-free
        # shares beside it).
        assert row["bits"] == 16 + (3 if row["clients"] == 6 else 4)
        assert row["uplink_vs_fp32"] == pytest.approx(row["bits"] / 32 * (1 + row["overhead_fraction"]), rel=1e-3)
        assert row["uplink_vs_fp32"] < 0.75 and 0 < row["overhead_fraction"] < 0.05
        step = 0.5 / (2**15 - 1)
        assert 0 < row["max_abs_error"] <= (row["clients"] - row["dropped"]) * step
        assert row["server_s"] >= row["unmask_s"] > 0 and row["client_s"] > 0
    assert rows["secagg-n10-drop30"]["dropped"] == 3
    assert (tmp_path / "report.html").exists()


@pytest.mark.processes
def test_a_bad_list_exits_2_naming_the_option():
    done = run_cli("bench", "secure", "--clients", "2,10")
    assert done.returncode == 2 and "--clients: 2 is outside [3, 1000]" in done.stderr
    done = run_cli("bench", "secure", "--drops", "x")
    assert done.returncode == 2 and "--drops: 'x' is not a comma-separated list" in done.stderr
