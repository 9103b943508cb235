"""Quantisation-aware training: ``--quantize qat-int8``."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from shoal.cli import app
from shoal.compress.onnx_export import ort_run, ort_session
from shoal.compress.qat import LAYERS, QatOptions, qat_int8
from shoal.data.base import build_dataset
from shoal.config import load_config
from tests.test_compress import digits_run, make_model, prune


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return digits_run(tmp_path_factory.mktemp("qat") / "run", model="cnn2d:channels=4,hidden=16", steps=120)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps on shared cores: one thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.mark.processes
def test_qat_keeps_pruned_zeros_and_ships_the_trained_int8_grid(tmp_path):
    data = build_dataset(load_config({"data": {"dataset": "digits"}, "model": "cnn2d"}).data.dataset)
    model = make_model("cnn2d:channels=4,hidden=16")
    masks = prune("magnitude:sparsity=0.8", model).masks
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]

    trained = qat_int8(QatOptions(steps=20, calibrate=2), tmp_path / "none.onnx", tmp_path / "qat.onnx",
                       train=data.train, seed=0, model=model, input_shape=(1, 8, 8))

    fake = {}  # what the trained model computed with: int8 per output channel on [-127, 127]
    for name, mask in masks.items():
        weight = trained.get_submodule(name.rpartition(".")[0]).weight.detach()  # through the fake quantisation
        assert not weight[~mask].any(), name
        rows = weight.reshape(weight.shape[0], -1)
        step = rows.abs().amax(dim=1, keepdim=True) / 127
        assert torch.allclose(rows / step, (rows / step).round(), atol=1e-3), name
        fake[name] = weight.numpy()
    assert len(fake) == len(layers)
    shipped = onnx.load(str(tmp_path / "qat.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in shipped.graph.initializer}
    for name, weight in fake.items():
        q = initializers[f"{name}_quantized"]
        scale = initializers[f"{name}_scale"].reshape(-1, *[1] * (q.ndim - 1))
        assert q.dtype == np.int8 and np.abs(q).max() <= 127
        assert not q[~masks[name].numpy()].any(), name  # pruned weights are int8 zeros
        np.testing.assert_allclose(q * scale, weight, atol=1e-6, err_msg=name)  # the grid that was trained on
    assert not (tmp_path / "qat.fp32.onnx").exists()


@pytest.mark.processes
def test_cli_qat_row_is_measured_in_onnx_runtime(run, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "compress", str(run / "config.yaml"), "--checkpoint", str(run), "--prune", "magnitude:sparsity=0.7",
        "--quantize", "int8-static", "--quantize", "qat-int8:steps=40,calibrate=2", "--repeats", "2", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "qat-int8" in result.stdout and "qat step 40/40" in result.stdout
    report = json.loads((out / "report.json").read_text())
    base, compressed, static, qat = report["rows"]
    assert qat["name"] == "qat-int8" and qat["kind"] == "quantized"
    assert qat["spec"].endswith("qat-int8:steps=40,lr=0.01,batch_size=64,calibrate=2")
    assert report["quantize"][-1] == "qat-int8:steps=40,lr=0.01,batch_size=64,calibrate=2"
    assert qat["onnx"] == "model.qat-int8.onnx" and qat["onnx_bytes"] < 0.7 * compressed["onnx_bytes"]
    assert qat["latency_ms_batch1"] > 0 and qat["latency_ms_batch32"] > 0
    # the floor: 40 steps of QAT lose nothing against the pruned fp32 model or post-training int8
    assert qat["accuracy"] >= max(0.7, compressed["accuracy"] - 0.01, static["accuracy"] - 0.01)
    # ORT's int8 model follows the fake-quantised PyTorch model it was trained as
    assert abs(qat["accuracy"] - qat["torch_accuracy"]) <= 0.01 and qat["max_abs_diff"] < 1.0
    session = ort_session(out / "model.qat-int8.onnx")
    assert {n.op_type for n in onnx.load(str(out / "model.qat-int8.onnx")).graph.node} >= {"QuantizeLinear", "Conv"}
    assert ort_run(session, np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 10)


@pytest.mark.parametrize("spec,message", [
    ("qat-int8:steps=0", "quantizer 'qat-int8': steps: Input should be greater than or equal to 1"),
    ("qat-int8:step=10", "quantizer 'qat-int8': step: Extra inputs are not permitted"),
    ("qat-int8:lr=-1", "quantizer 'qat-int8': lr: Input should be greater than 0"),
])
def test_bad_qat_options_exit_2_with_one_line(tmp_path, spec, message):
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: digits}\nmodel: mlp:hidden=[16]\n")

    result = CliRunner().invoke(app, ["compress", str(config), "--checkpoint", str(tmp_path), "--quantize", spec,
                                      "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert result.stderr.strip() == f"compress error: {message}"
    assert not (tmp_path / "out").exists()
