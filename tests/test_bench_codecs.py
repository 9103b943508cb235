import json

import pytest

from tests.conftest import invoke_cli, run_cli


@pytest.mark.processes
def test_bench_codecs_reports_every_codec_and_the_sampled_topk_speedup(tmp_path):
    result = run_cli("bench", "codecs", "--numel", "200000", "--repeats", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [row["codec"] for row in report["rows"]]
    assert "none" in names and "powersgd:rank=4" in names and "topk:ratio=0.001,sample=0.01" in names
    for row in report["rows"]:
        assert row["median_s"] > 0 and row["wire_bytes"] > 0
    by_name = {row["codec"]: row for row in report["rows"]}
    assert by_name["fp16"]["compression"] == 2 and by_name["signsgd"]["compression"] > 30
    assert report["sampled_topk_speedup"] > 0
    assert "sampled top-k" in result.stdout
    # The identity codec does no work: no throughput for it (it printed 1560 GB/s), a memory copy instead.
    assert by_name["none"]["passthrough"] and by_name["none"]["gb_per_s"] is None
    assert not by_name["fp16"]["passthrough"] and by_name["fp16"]["gb_per_s"] > 0
    assert report["copy_gb_per_s"] > 0 and "(memory copy)" in result.stdout
    none_row = next(line for line in result.stdout.splitlines() if line.startswith("│ none "))
    assert none_row.split("│")[3].strip() == "-"


@pytest.mark.processes
def test_bench_codecs_rejects_a_bad_codec(tmp_path):
    result = invoke_cli("bench", "codecs", "--numel", "5000", "--codec", "zip")
    assert result.returncode == 2 and "unknown codec 'zip'" in result.stderr
