"""A codec written outside shoal, in this file, and named by its entry point, runs
under ``sync``, ``async_ps`` and ``shoal fl simulate`` with no other file edited:
what each needs of it is read from the capabilities its class declares."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import shoal
from shoal.comm.codecs import Capabilities, Codec, CodecOptions, Payload, build_codec
from shoal.config import load_config
from shoal.fl.config import load_fl_config
from shoal.fl.simulate import simulate
from shoal.registry import CODECS
from tests.conftest import small_config

SPEC = "tests.test_codec_plugin:Int16Steps"


class StepOptions(CodecOptions):
    step: float = Field(1e-4, gt=0)


class Int16Steps(Codec):
    """Each value as a signed 16-bit multiple of ``step`` (clamped): half of fp32's bytes."""

    capabilities = Capabilities(summable=False, integer=True)
    Options = StepOptions

    def encode(self, tensor: torch.Tensor) -> Payload:
        levels = torch.round(tensor.float() / self.options.step).clamp_(-32767, 32767).to(torch.int16)
        return Payload([levels], {"dtype": tensor.dtype})

    def decode(self, payload: Payload) -> torch.Tensor:
        (levels,) = payload.tensors
        return (levels.float() * self.options.step).to(payload.ctx["dtype"])


class NoCapabilities:
    """Not a codec: it declares nothing."""


def test_an_entry_point_codec_gets_its_options_validated_and_round_trips():
    component = CODECS.resolve(f"{SPEC}:step=0.001,memory=ef")
    codec = build_codec(component)
    x = torch.linspace(-1, 1, 101)

    assert component.entry_point and component.options.step == 0.001 and component.options.memory == "ef"
    assert (codec.decode(codec.encode(x)) - x).abs().max() <= 0.0005 + 1e-7
    assert codec.encode(x).wire_bytes == 2 * x.numel()
    with pytest.raises(ValueError, match=r"step: Input should be greater than 0"):
        CODECS.resolve(f"{SPEC}:step=-1")
    with pytest.raises(ValueError, match="must be a shoal.comm.codecs.Codec subclass"):
        CODECS.resolve("tests.test_codec_plugin:NoCapabilities")
    # The config layer accepts it as it accepts a built-in codec.
    assert load_config({"codec": SPEC}).codec.target.__qualname__ == "Int16Steps"


@pytest.mark.processes
@pytest.mark.parametrize("strategy", ["sync", "async_ps"])
def test_an_entry_point_codec_trains_under_data_parallel_and_a_parameter_server(tmp_path, strategy):
    # 80 steps, as the parameter-server tests train: under async_ps the order in which pushes
    # arrive varies from run to run, and 40 steps left accuracy within a hair of the bar.
    summary = shoal.train(small_config(tmp_path / "run", strategy=strategy, codec=SPEC,
                                       optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.5},
                                       train__steps=80, train__eval_every=40))
    assert summary.final_accuracy > 0.7, summary.final_accuracy
    # int16 levels: half of fp32's bytes, all-gathered (sync), or pushed while the pulled
    # weights stay fp32 (async_ps: half of one way, all of the other).
    share = 0.5 if strategy == "sync" else 0.75
    assert summary.wire_bytes_per_worker == pytest.approx(share * summary.dense_bytes_per_worker, rel=0.01)


def test_an_entry_point_codec_carries_a_federations_uplink(tmp_path):
    cfg = load_fl_config({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[16]",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "fl": {"clients": 4, "clients_per_round": 4, "rounds": 3, "codec": SPEC},
        "out": str(tmp_path / "fl"),
    })
    summary = simulate(cfg)
    fp32 = summary["parameters"] * 4 * 4 * 3  # 4 clients, 3 rounds
    assert summary["codec"] == SPEC and summary["uplink_bytes"] == fp32 // 2
    assert summary["final_accuracy"] > 0.3
