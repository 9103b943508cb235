"""``shoal bench secure``: SecAgg+'s cost rows, measured against plain aggregation in the same run."""

import importlib.util
import json
import sys

import pytest
from typer.testing import CliRunner

from shoal.bench import flower_secagg
from shoal.cli import app
from tests.conftest import invoke_cli, run_cli

FLOWER = flower_secagg.available()


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
def test_a_bad_option_exits_2_naming_it():
    done = invoke_cli("bench", "secure", "--clients", "2,10")
    assert done.returncode == 2 and "--clients: 2 is outside [3, 1000]" in done.stderr
    done = invoke_cli("bench", "secure", "--drops", "x")
    assert done.returncode == 2 and "--drops: 'x' is not a comma-separated list" in done.stderr


def test_flower_missing_exits_2_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr raises ImportError
    result = CliRunner().invoke(app, ["bench", "secure", "--quick", "--flower", "--out", str(tmp_path)])
    assert result.exit_code == 2 and 'Flower is not installed: pip install -e ".[bench-flower]"' in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_flower_shares_count_the_client_itself_and_stay_odd():
    assert flower_secagg.flower_shares(9, 10) == 10  # everyone: Flower's full graph
    assert flower_secagg.flower_shares(18, 50) == 19
    assert flower_secagg.flower_shares(21, 100) == 23  # 22 is even: Flower would warn and add one


@pytest.mark.skipif(FLOWER is not None, reason=f"the Flower baseline: {FLOWER}")
def test_flower_secagg_runs_the_same_round_and_sends_int64_words(tmp_path):
    from shoal.bench import secure

    assert importlib.util.find_spec("flwr") is not None
    rows = {r["label"]: r for r in secure.run_bench(clients=[6], drops=[0.0, 0.3], numel=5_000, repeat=1,
                                                      out=tmp_path, log=lambda line: None, flower=True)}
    assert set(rows) == {"secagg-n6-drop0", "flower-n6-drop0", "secagg-n6-drop30", "flower-n6-drop30"}
    for drop in ("drop0", "drop30"):
        ours, theirs = rows[f"secagg-n6-{drop}"], rows[f"flower-n6-{drop}"]
        assert theirs["dropped"] == ours["dropped"] and theirs["survivors"] == ours["survivors"]
        assert theirs["threshold"] == ours["threshold"]
        # Flower uploads each masked value as an int64 word: 2x fp32, plus its keys and shares.
        assert 2.0 < theirs["uplink_vs_fp32"] < 2.3 and ours["uplink_vs_fp32"] < theirs["uplink_vs_fp32"] / 3
        # Its sum is right to Flower's quantisation: 2^22 levels scaled by 1 / max_weight (1000).
        assert 0 < theirs["max_abs_error"] < ours["survivors"] * 1e-3
        assert theirs["server_s"] >= theirs["unmask_s"] > 0 and theirs["client_s"] > 0
    assert rows["flower-n6-drop30"]["dropped"] == 2
