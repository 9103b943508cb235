"""The planner's arithmetic, and `shoal plan` end to end."""

import json

import pytest

from shoal.netem.costmodel import Link, allreduce_s
from shoal.parallel.plan import (CODECS, LayerCost, candidates, data_parallel, fit_layer, parse_bytes,
                                 parse_seconds, pipeline, recommend)
from tests.conftest import invoke_cli

LINK = Link(alpha_s=50e-6, beta_bytes_per_s=1.25e9)  # 10 Gbit/s


def uniform(n=8, per_sample=1e-4, params=4_000_000, act=4096):
    return [LayerCost(fixed_s=0.0, per_sample_s=per_sample, param_bytes=params, activation_bytes_per_sample=act,
                      matrices=((1000, 1000),)) for _ in range(n)]


def test_fit_layer_recovers_a_line_and_never_goes_negative():
    assert fit_layer(0.002, 8, 0.005, 32) == pytest.approx((0.001, 0.000125))
    assert fit_layer(0.005, 8, 0.004, 32) == (0.005, 0.0)  # noise: a flat line, not a negative slope


def test_data_parallel_is_compute_plus_ring_all_reduce():
    layers = uniform()
    none = data_parallel(layers, 4, 32, LINK, CODECS[0], optimizer_states=1, cap=None)
    assert none.compute_s == pytest.approx(8 * 32 * 1e-4)
    assert none.comm_s == pytest.approx(allreduce_s(8 * 4_000_000, 4, LINK))
    assert none.memory_bytes == pytest.approx(8 * 4_000_000 * 3 + 8 * 4096 * 32)
    fp16 = data_parallel(layers, 4, 32, LINK, CODECS[1], optimizer_states=1, cap=None)
    assert fp16.wire_bytes == pytest.approx(none.wire_bytes / 2)
    powersgd = data_parallel(layers, 4, 32, LINK, CODECS[2], optimizer_states=1, cap=None)
    assert powersgd.wire_bytes < none.wire_bytes / 50  # rank 4 of 1000 x 1000 matrices


def test_pipeline_step_is_m_plus_p_minus_one_slots_of_the_slowest_stage():
    layers = uniform(per_sample=1e-4, act=0)  # no activation traffic: pure compute slots
    layout = pipeline(layers, stages=4, replicas=1, microbatches=8, global_batch=64, link=LINK,
                      optimizer_states=0, cap=None)
    slot = 2 * 1e-4 * 8  # 2 layers per stage, microbatch of 8
    assert layout.step_s == pytest.approx((8 + 4 - 1) * slot)
    assert layout.bubble_fraction == pytest.approx(3 / 11)
    assert layout.partition == [[0, 2], [2, 4], [4, 6], [6, 8]]
    gpipe = pipeline(layers, 4, 1, 8, 64, LINK, 0, None, schedule="gpipe")
    assert gpipe.memory_bytes == layout.memory_bytes  # no activations here; see below with them
    with_act = uniform(act=1e6)
    assert pipeline(with_act, 4, 1, 8, 64, LINK, 0, None, "gpipe").memory_bytes > \
        pipeline(with_act, 4, 1, 8, 64, LINK, 0, None, "1f1b").memory_bytes  # 1F1B holds at most P microbatches


def test_interleaved_pipeline_has_v_times_the_slots_of_a_chunk_and_a_smaller_bubble():
    layers = uniform(per_sample=1e-4, act=0)
    plain = pipeline(layers, stages=2, replicas=1, microbatches=8, global_batch=64, link=LINK,
                     optimizer_states=0, cap=None)
    looped = pipeline(layers, 2, 1, 8, 64, LINK, 0, None, schedule="interleaved", virtual=2)
    chunk = 2 * 1e-4 * 8  # 8 layers in 4 chunks of 2, microbatch of 8
    assert looped.step_s == pytest.approx((2 * 8 + 2 - 1) * chunk)
    assert looped.bubble_fraction == pytest.approx(1 / 17) and plain.bubble_fraction == pytest.approx(1 / 9)
    assert looped.step_s < plain.step_s and looped.label == "pipeline P=2 M=8 V=2"
    assert looped.partition == [[0, 2], [2, 4], [4, 6], [6, 8]]  # rank 0 holds chunks 0 and 2
    assert looped.memory_bytes == plain.memory_bytes  # each rank still holds half the layers
    # Every chunk boundary sends: rank 0's chunks 0 and 2 have three cuts between them, not one.
    sending = uniform(act=1e4)
    assert pipeline(sending, 2, 1, 8, 64, LINK, 0, None, "interleaved", virtual=2).wire_bytes == \
        pytest.approx(3 * pipeline(sending, 2, 1, 8, 64, LINK, 0, None).wire_bytes)
    labels = [layout.label for layout in candidates(layers, 2, 32, LINK, 0, cap=None)]
    assert "pipeline P=2 M=8 V=2" in labels and "pipeline P=2 M=8" in labels


def test_recommendation_respects_the_memory_cap_and_says_why():
    layers = uniform()
    everything = candidates(layers, 4, 32, LINK, 1, cap=None)
    assert [x.step_s for x in everything] == sorted(x.step_s for x in everything)
    dp_memory = everything[0].memory_bytes
    capped = candidates(layers, 4, 32, LINK, 1, cap=dp_memory * 0.6)
    best, reason = recommend(capped)
    assert best is not None and best.kind in ("pipeline", "hybrid") and best.memory_bytes <= dp_memory * 0.6
    assert "would be faster but needs" in reason
    nothing, why = recommend(candidates(layers, 4, 32, LINK, 1, cap=1.0))
    assert nothing is None and "nothing fits" in why


@pytest.mark.parametrize("text, value", [("16GiB", 16 * 2**30), ("512MB", 512e6), ("1000", 1000.0)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_errors():
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")
    assert parse_seconds("50us") == pytest.approx(50e-6) and parse_seconds("2ms") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="expected a latency"):
        parse_seconds("fast")


@pytest.mark.processes
def test_plan_cli_prints_and_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    result = invoke_cli("plan", "examples/mnist1d.yaml", "--workers", "4", "--rate", "1gbit", "--latency", "100us",
                        "--memory", "64MiB", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "recommended:" in result.stdout and "best layout at scale" in result.stdout
    report = json.loads(out.read_text())
    labels = [row["label"] for row in report["layouts"]]
    assert "data x4 none" in labels and any(label.startswith("pipeline P=2") for label in labels)
    assert report["recommended"] in labels and len(report["scaled"]) == 9
    assert all(row["step_s"] > 0 for row in report["layouts"])


@pytest.mark.processes
def test_plan_of_a_model_that_is_not_a_layer_sequence_uses_its_export_split_points(tmp_path):
    config, out = tmp_path / "tiny.yaml", tmp_path / "plan.json"
    config.write_text("data: {dataset: 'mnist1d:samples=400', batch_size: 16}\n"
                      "model: 'transformer:d_model=32,layers=2,heads=2,ff=64'\n")
    result = invoke_cli("plan", str(config), "--workers", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["layers"] == len(report["pieces"]) >= 2
    assert any(row["label"].startswith("pipeline P=2") for row in report["layouts"])


@pytest.mark.processes
def test_plan_cli_bad_rate_exits_2(tmp_path):
    result = invoke_cli("plan", "examples/mnist1d.yaml", "--rate", "fast")
    assert result.returncode == 2 and "expected a tc rate" in result.stderr


def test_interleaved_in_flight_follows_pytorchs_rounds():
    from shoal.parallel.plan import in_flight
    from shoal.strategies.pipeline import PipelineOptions

    # Rank 0 warms up with (V-1)R + 2(P-1) forwards, plus one in its steady state; they go R at a
    # time through chunk 0, then chunk 1, ...: P=4, V=2, M=8 (R=4) holds 7 on chunk 0 and 4 on chunk 1.
    assert in_flight("interleaved", 8, 4, 2) == 7
    assert in_flight("interleaved", 10, 4, 3) == 7  # R = 10 // 2 = 5: 17 forwards, chunk 0 holds 5 + 2
    assert in_flight("interleaved", 2, 4, 2) == 2 and in_flight("gpipe", 8, 4) == 8 and in_flight("1f1b", 8, 4) == 4
    with pytest.raises(ValueError, match="microbatches=9 must be a multiple of 2"):
        PipelineOptions(stages=4, microbatches=9, schedule="interleaved")


def test_the_layouts_table_reads_at_80_columns_with_every_number_whole():
    from rich.console import Console

    from shoal.parallel.planner import layouts_table

    row = {"label": "pipeline P=4 M=16 V=2 x dp 2", "step_s": 1.1672345, "compute_s": 0.9876, "comm_s": 12.3456,
           "bubble_fraction": 0.43, "memory_bytes": 12345.6 * 2**20, "wire_bytes": 9876.54e6, "fits": False}
    report = {"model": "resnet", "parameters": 11_000_000, "layers": 12, "workers": 4, "batch_per_worker": 32,
              "link": {"mbit_per_s": 10_000, "latency_s": 50e-6}, "memory_cap_bytes": 2**30,
              "memory_cap_from": "--memory", "layouts": [row, {**row, "label": "data x4 powersgd:rank=4"}]}
    console = Console(width=80, record=True, color_system=None)
    console.print(layouts_table(report))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for cell in ("1,167.2", "987.6", "12,345.6", "0.43", "9,876.54", "comm+idle", "no"):
        assert cell in text, cell


@pytest.mark.processes
def test_plan_takes_the_configs_own_memory_cap(tmp_path):
    config, out = tmp_path / "capped.yaml", tmp_path / "plan.json"
    config.write_text("data: {dataset: 'mnist1d:samples=400', batch_size: 16}\nmodel: mlp\n"
                      "strategy: 'pipeline:stages=2,max_memory_per_worker=1KiB'\n")
    result = invoke_cli("plan", str(config), "--workers", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["memory_cap_bytes"] == 1024 and report["memory_cap_from"] == "strategy.max_memory_per_worker"
    assert not any(row["fits"] for row in report["layouts"]) and report["recommended"] is None
    assert "memory cap" in result.stdout
