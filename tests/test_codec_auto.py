"""codec: auto — the alpha-beta model, the probe, and the choice on real shaped links."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import shoal
from shoal.netem import costmodel
from shoal.comm.codecs.auto import AutoOptions
from shoal.comm.codec_choice import candidate_specs
from shoal.netem import Testbed, check_available
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import small_config


def test_allreduce_and_allgather_follow_the_ring_formulas():
    link = costmodel.Link(alpha_s=1e-3, beta_bytes_per_s=1e6)
    # 4 workers, 1 MB: 2*3 latencies + 2*3/4 of the bytes
    assert costmodel.allreduce_s(1e6, 4, link) == pytest.approx(6e-3 + 1.5)
    assert costmodel.allgather_s(1e4, 4, link) == pytest.approx(3e-3 + 3e-2)
    assert costmodel.allreduce_s(1e6, 1, link) == 0.0
    assert costmodel.allreduce_s(1e6, 4, link, messages=3) == pytest.approx(18e-3 + 1.5)


def test_fit_recovers_the_link_that_produced_the_timings():
    true = costmodel.Link(alpha_s=2e-4, beta_bytes_per_s=12.5e6)  # 100 Mbit/s
    small, large = 64, 4 * 2**20
    fitted = costmodel.fit_allreduce(
        small, costmodel.allreduce_s(small, 4, true), large, costmodel.allreduce_s(large, 4, true), 4
    )
    assert fitted.beta_bytes_per_s == pytest.approx(true.beta_bytes_per_s, rel=1e-9)
    assert fitted.alpha_s == pytest.approx(true.alpha_s, rel=1e-6)
    assert fitted.mbit_per_s == pytest.approx(100.0)
    # Noise that makes the large probe no slower than the small one still gives a finite link.
    noisy = costmodel.fit_allreduce(small, 0.01, large, 0.009, 4)
    assert 0 < noisy.beta_bytes_per_s < float("inf")
    with pytest.raises(ValueError):
        costmodel.fit_allreduce(small, 0.01, large, 0.02, 1)


def test_best_weighs_step_time_by_the_steps_a_codec_needs():
    exact = costmodel.CodecCost("fp16", compute_s=0.1, codec_s=0.0, comm_s=0.1, step_factor=1.0)
    lossy = costmodel.CodecCost("topk", compute_s=0.1, codec_s=0.01, comm_s=0.01, step_factor=1.35)
    assert costmodel.best([exact, lossy]).name == "topk"  # 0.2 vs 1.35 * 0.12
    slow_net = costmodel.CodecCost("topk", compute_s=0.1, codec_s=0.01, comm_s=0.01, step_factor=2.0)
    assert costmodel.best([exact, slow_net]).name == "fp16"  # 0.2 vs 0.24
    # Local SGD communicates every `period` steps: the link matters less.
    local = costmodel.CodecCost("none", compute_s=0.1, codec_s=0.0, comm_s=0.8, step_factor=1.0, period=8)
    assert local.step_s == pytest.approx(0.2)


def test_candidates_come_with_their_options():
    specs = candidate_specs(AutoOptions(candidates=["none", "topk", "int8", "powersgd"], topk_ratio=0.05,
                                        topk_steps=1.5, powersgd_rank=2))
    assert specs == [("none", 1.0), ("topk:ratio=0.05,sample=0.01,memory=ef", 1.5), ("int8:memory=ef", 1.05),
                     ("powersgd:rank=2,memory=ef", 1.25)]
    assert [s for s, _ in candidate_specs(AutoOptions())] == [
        "none", "fp16", "topk:ratio=0.01,sample=0.01,memory=ef", "powersgd:rank=4,memory=ef"]


@pytest.mark.processes
@pytest.mark.parametrize("model", [
    "resnet:width=4,stages=2",  # batch norm: the probe's passes move running statistics
    "transformer:d_model=16,heads=2,layers=1,ff=32,dropout=0.2",  # dropout: they draw random numbers
])
def test_the_probe_leaves_no_trace(tmp_path, model):
    # With one candidate the choice is fixed: the run must then be bit-identical
    # to naming that codec, so the probe changed no weight, buffer or random stream.
    shoal.train(small_config(tmp_path / "named", codec="none", model=model))
    auto = shoal.train(small_config(tmp_path / "auto", codec="auto:candidates=[none]", model=model))
    assert auto.codec == "auto" and auto.codec_chosen == "none"
    assert auto.codec_auto["workers"] == 2 and auto.codec_auto["link_mbit_per_s"] > 0
    a = load_checkpoint(tmp_path / "named" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.processes
def test_a_resumed_run_keeps_its_first_choice(tmp_path):
    cfg = small_config(tmp_path / "run", codec="auto:candidates=[topk]", train__steps=20, train__eval_every=20)
    first = shoal.train(cfg)
    assert first.codec_chosen.startswith("topk:")
    # Offered other candidates on resume, it must still use the codec whose residuals it saved.
    cfg = {**cfg, "codec": "auto:candidates=[none]", "train": {"steps": 40, "eval_every": 20}}
    resumed = shoal.train(cfg, resume=True)
    assert resumed.resumed_from_step == 20 and resumed.codec_chosen == first.codec_chosen
    assert resumed.wire_bytes_per_worker < resumed.dense_bytes_per_worker / 10


def test_auto_is_not_a_codec_to_call_directly():
    from shoal.comm.codecs.auto import AutoCodec

    with pytest.raises(RuntimeError, match="chooses at the first step"):
        AutoCodec(AutoOptions()).encode(torch.zeros(4))


@pytest.mark.processes
@pytest.mark.netns
@pytest.mark.skipif(check_available() is not None, reason=str(check_available()))
@pytest.mark.parametrize("rate,compressed", [("10mbit", True), (None, False)])
def test_auto_compresses_on_a_slow_link_and_not_on_a_fast_one(tmp_path, rate, compressed):
    from shoal.bench.comm import run_on_testbed

    config = tmp_path / "auto.yaml"
    # A model whose step takes tens of milliseconds of compute, as any real one does:
    # on a fast link that, not microseconds of latency, is what the choice weighs.
    # (With a few milliseconds, a fast link measured slowly on a loaded machine tipped
    # the choice to top-k.) Offered none, fp16 and top-k: at 10 Mbit/s top-k wins by
    # far over fp16 unless a step computes for most of a second.
    cfg = small_config(tmp_path / "unused", model="cnn1d", data__dataset="mnist1d:samples=4000", data__batch_size=1024)
    config.write_text(yaml.safe_dump(cfg))
    with Testbed(2, rate=rate) as testbed:
        summary, tail = run_on_testbed(
            testbed, config, ["codec=auto:probe_mb=0.5,candidates=[none,fp16,topk]", "train.steps=10"],
            tmp_path / "run", timeout_s=300,
        )
    assert summary is not None, tail
    chosen, auto = summary["codec_chosen"], summary["codec_auto"]
    assert chosen == min(auto["predictions"], key=lambda p: p["time_factor"])["spec"], auto
    assert chosen.startswith("topk:") == compressed, auto
    measured = auto["link_mbit_per_s"]
    if rate:
        assert 5 < measured < 11  # tbf at 10 Mbit/s, measured through gloo
    else:
        assert measured > 50  # veth carries some 1 Gbit/s here, less when the cores are contended
    assert "chose " + chosen in Path(tmp_path / "run" / "host0.log").read_text()
