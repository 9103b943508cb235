"""``shoal bench privacy --quick``: every kind of row runs through the real CLI and lands in
bench.json with its ratios, report.html and the plots."""

import json

import pytest

from conftest import invoke_cli, run_cli
from shoal.bench.privacy import opacus_missing


@pytest.mark.processes
def test_the_quick_privacy_bench_compares_dp_sgd_with_non_private_training_opacus_and_dp_fedavg(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "privacy", "--quick", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["label"]: r for r in json.loads((out / "bench.json").read_text())}
    assert set(rows) == {"none", "dp-sgd-eps8", "opacus-eps8", "fedavg", "dp-fedavg-eps8"}
    assert not any(r["failed"] for r in rows.values())
    private = rows["dp-sgd-eps8"]
    assert 0 < private["epsilon"] <= 8 and private["noise_multiplier"] > 0.3
    assert 0 < private["throughput_vs_none"] < 2
    assert rows["none"]["epsilon"] is None and rows["none"]["final_accuracy"] > 0.5
    fl = rows["dp-fedavg-eps8"]
    assert 0 < fl["epsilon"] <= 8 and "accuracy_vs_fedavg" in fl
    assert (out / "report.html").is_file() and (out / "accuracy-vs-epsilon.png").is_file()
    assert (out / "dp-fedavg-eps8-clip.png").is_file()  # adaptive clipping's trajectory
    missing = opacus_missing()
    if missing:
        assert rows["opacus-eps8"]["skipped"] == missing and "opacus-eps8: skipped" in result.stdout
    else:
        opacus = rows["opacus-eps8"]
        assert 0 < opacus["epsilon"] <= 8.1 and opacus["epsilon_opacus"] <= 8.1
        assert private["accuracy_vs_opacus"] == pytest.approx(private["final_accuracy"] - opacus["final_accuracy"])


@pytest.mark.processes
def test_a_bad_bench_option_exits_2_naming_it(tmp_path):
    result = invoke_cli("bench", "privacy", "--quick", "--out", str(tmp_path), "--set", "bench.epsilons=[]")
    assert result.returncode == 2
    assert "bench: epsilons" in result.stderr and "Traceback" not in result.stderr
    unknown = invoke_cli("bench", "privacy", "--quick", "--out", str(tmp_path), "--rows", "dp-sgd-eps5")
    assert unknown.returncode == 2 and "allowed: none, dp-sgd-eps8" in unknown.stderr
