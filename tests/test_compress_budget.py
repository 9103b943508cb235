"""``shoal compress --target-size-kb / --target-latency-ms``: the budget search."""

import json

import pytest
import torch
from typer.testing import CliRunner

import shoal
from shoal.cli import app
from shoal.compress.budget import Candidate, describe, families, overshoot, pick
from tests.test_compress import digits_run


def candidate(label, size, latency, accuracy, within):
    return Candidate(label=label, spec=label, size_bytes=size, latency_ms_batch32=latency, accuracy=accuracy,
                     within=within, file=label)


def test_the_most_accurate_candidate_within_the_budget_wins():
    cands = [candidate("big", 9000, 0.1, 0.99, False), candidate("a", 4000, 0.2, 0.95, True),
             candidate("b", 3000, 0.2, 0.97, True), candidate("c", 2000, 0.1, 0.97, True)]

    assert pick(cands).label == "c"  # b and c tie on accuracy: the smaller wins
    assert pick(cands[:1]) is None
    assert overshoot(cands[0], 3, 0.2) == 3.0 and overshoot(cands[0], None, 0.05) == 2.0


def test_families_search_what_each_budget_can_change():
    size = families(size=True, latency=False, sparsities=(0.5, 0.9), channel_ratios=(0.5,))
    latency = families(size=False, latency=True, sparsities=(0.5, 0.9), channel_ratios=(0.5,))
    both = families(size=True, latency=True, sparsities=(0.9,), channel_ratios=(0.5,))

    assert size == [[[]], [["magnitude:sparsity=0.5"], ["magnitude:sparsity=0.9"]]]
    assert latency == [[[]], [["channels:ratio=0.5"]]]
    assert both[-1] == [["channels:ratio=0.5", "magnitude:sparsity=0.9"]]


@pytest.mark.processes
def test_a_size_budget_that_can_be_met_picks_a_candidate_within_it(tmp_path):
    run = digits_run(tmp_path / "run")

    report = shoal.compress.search_budget(run / "config.yaml", checkpoint=run, target_size_kb=12,
                                          sparsities=(0.5, 0.9), out=tmp_path / "out", repeats=3)

    winner = report.winner
    assert winner.within and winner.size_bytes <= 12_000
    # The unpruned model's fp32 artefact (~37 KB) and int8 ONNX (~22 KB) are over; its int8 values fit.
    labels = [c.label for c in report.candidates]
    assert labels[:2] == ["unpruned/fp32-values", "unpruned/int8-static"]
    assert not report.candidates[0].within and report.candidates[0].size_bytes > 12_000
    assert winner.accuracy == max(c.accuracy for c in report.candidates if c.within)
    assert winner.label == "unpruned/int8-values" and len(labels) == 3  # the unpruned model fits: no pruning tried
    saved = json.loads((tmp_path / "out" / "budget.json").read_text())
    assert saved["winner"]["label"] == winner.label and len(saved["candidates"]) == 3
    assert (tmp_path / "out" / "candidates" / "unpruned-int8-values" / "model.shoal").stat().st_size == winner.size_bytes


@pytest.mark.processes
def test_an_impossible_budget_raises_naming_it_and_the_closest_candidate(tmp_path):
    run = digits_run(tmp_path / "run")

    with pytest.raises(shoal.compress.BudgetError) as caught:
        shoal.compress.search_budget(run / "config.yaml", checkpoint=run, target_latency_ms=0.0001,
                                     target_size_kb=1000, sparsities=(0.9,), channel_ratios=(0.5,), out=tmp_path / "out", repeats=3)

    message = str(caught.value)
    # Zeros run no faster: prune-90 and channels-50+prune-90 are skipped once their dense plans were too slow.
    assert message.startswith("no candidate meets --target-size-kb 1000 and --target-latency-ms 0.0001 (batch 32): "
                              "4 tried")
    report = caught.value.report
    # The closest is the fastest candidate measured (removed channels, usually: which of
    # them is a matter of microseconds on a loaded machine, so it is read, not assumed).
    fastest = min(report.candidates, key=lambda c: c.latency_ms_batch32)
    assert f"the closest is {describe(fastest)}" in message
    assert report.winner is None and [c.label for c in report.candidates] == [
        "unpruned/fp32-values", "unpruned/int8-static", "channels-50/fp32-values", "channels-50/int8-static"]
    assert not any(c.within for c in report.candidates)
    assert json.loads((tmp_path / "out" / "budget.json").read_text())["winner"] is None


@pytest.mark.slow
def test_an_impossible_budget_exits_2_naming_it_and_the_closest_candidate(tmp_path):
    run = digits_run(tmp_path / "run")

    result = CliRunner().invoke(app, [
        "compress", str(run / "config.yaml"), "--checkpoint", str(run), "--target-latency-ms", "0.0001",
        "--repeats", "3", "--out", str(tmp_path / "out")])

    assert result.exit_code == 2, result.output
    message = result.stderr
    assert "budget not met" in message and "--target-latency-ms 0.0001 (batch 32)" in message
    assert "Traceback" not in message
    tried = json.loads((tmp_path / "out" / "budget.json").read_text())
    fastest = min(tried["candidates"], key=lambda c: c["latency_ms_batch32"])
    assert f"the closest is {fastest['label']}" in message
    assert tried["winner"] is None and len(tried["candidates"]) == 2 + 2 * 3  # unpruned + 3 channel ratios


def test_budget_refuses_prune_specs_and_nonsense_budgets(tmp_path):
    result = CliRunner().invoke(app, ["compress", "c.yaml", "--checkpoint", str(tmp_path), "--target-size-kb", "10",
                                      "--prune", "magnitude:sparsity=0.5"])
    assert result.exit_code == 2 and "leave out --prune and --quantize" in result.stderr
    with pytest.raises(shoal.compress.CompressError, match="--target-size-kb -1: must be > 0"):
        shoal.compress.search_budget({"data": {"dataset": "digits"}}, checkpoint=tmp_path, target_size_kb=-1)


@pytest.mark.slow
def test_a_fine_tuned_plan_is_stored_again_with_int8_values_not_trained_again(tmp_path):
    run = digits_run(tmp_path / "run")

    report = shoal.compress.search_budget(run / "config.yaml", checkpoint=run, target_size_kb=3, sparsities=(0.9,),
                                          out=tmp_path / "out", repeats=3, finetune_steps=20, overrides=["workers=1"])

    # The 90%-pruned artefact in fp32 values (~4.7 KB) misses; the same fine-tuned model in int8 values fits.
    by_label = {c.label: c for c in report.candidates}
    fp32, int8 = by_label["prune-90/fp32-values"], by_label["prune-90/int8-values"]
    assert not fp32.within and int8.within and report.winner.label == "prune-90/int8-values"
    assert int8.spec.startswith("magnitude:sparsity=0.9") and "values=int8" in int8.spec
    candidates = tmp_path / "out" / "candidates"
    assert (candidates / "prune-90" / "finetune").is_dir() and not (candidates / "prune-90-int8-values" / "finetune").exists()
    # Stored from the fine-tuned weights: the same zeros, the values within int8's step of the fp32 ones.
    tuned = shoal.compress.load_artefact(candidates / "prune-90" / "model.shoal")
    again = shoal.compress.load_artefact(int8.file)
    for (name, a), b in zip(tuned.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a == 0, b == 0), name
        assert (a - b).abs().max() <= a.abs().max() / 127 + 1e-6, name
