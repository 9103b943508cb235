"""Pruning, the sparse artefact, ONNX export and quantisation, in-process."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shoal
from shoal.compress import CompressError, load_artefact, read_artefact, save_artefact
from shoal.models.artefact_file import decode_tensor, encode_tensor
from shoal.engine.sparsity import weight_slots
from shoal.compress.conv1d_as_2d import conv1d_as_conv2d
from shoal.compress.load import load_trained
from shoal.compress.measure import state_bytes
from shoal.compress.onnx_export import export_onnx, ort_run, ort_session
from shoal.config import load_config
from shoal.data.base import build_dataset
from shoal.models import build_model
from shoal.registry import MODELS, PRUNERS, load_builtins
from shoal.engine.checkpoint import save_checkpoint

load_builtins(MODELS, PRUNERS)


def make_model(spec: str, shape=(1, 8, 8), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    component = MODELS.resolve(spec)
    return component.target(component.options, shape, 10).eval()


def prune(spec: str, model: nn.Module, shape=(1, 8, 8)):
    component = PRUNERS.resolve(spec)
    return component.target(component.options, model, torch.zeros(2, *shape))


def digits_run(tmp_path, model="cnn2d:channels=8,hidden=32", steps=150):
    """A trained model saved as ``shoal train`` saves it (config.yaml + checkpoint.pt), trained in-process."""
    cfg = load_config({"data": {"dataset": "digits"}, "model": model, "out": str(tmp_path)})
    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(0)
    net = build_model(cfg.model, data)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train.tensors
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: on a busy 2-core machine two threads ran 14x slower than one
    try:
        for _ in range(steps):
            idx = torch.randint(len(y), (32,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": net.state_dict(), "run": {}, "workers": []})
    return tmp_path


def test_global_magnitude_zeroes_exactly_the_smallest_weights_across_layers():
    model = make_model("mlp:hidden=[64,32]")
    before = {name: getattr(m, attr).detach().clone() for name, m, attr in weight_slots(model)}
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}

    result = prune("magnitude:sparsity=0.7", model)

    total = sum(w.numel() for w in before.values())
    zeros = sum(int((getattr(m, a) == 0).sum()) for _, m, a in weight_slots(model))
    assert zeros == round(0.7 * total)
    removed = torch.cat([before[n][~result.masks[n]].abs() for n in before])
    kept = torch.cat([before[n][result.masks[n]].abs() for n in before])
    assert removed.max() <= kept.min()
    for name, m, attr in weight_slots(model):  # survivors keep their values; masks are the zeros
        assert torch.equal(getattr(m, attr), before[name] * result.masks[name])
    # global, not per layer: layers get different sparsities
    sparsities = [1 - result.masks[n].float().mean().item() for n in before]
    assert max(sparsities) - min(sparsities) > 0.01
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            assert torch.equal(p, biases[n])


def test_layer_magnitude_prunes_each_layer_to_the_fraction():
    model = make_model("cnn2d:channels=4,hidden=16")
    result = prune("magnitude:sparsity=0.5,scope=layer", model)
    for name, mask in result.masks.items():
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name


@pytest.mark.parametrize("spec,shape", [("cnn2d:channels=8,hidden=32", (1, 8, 8)), ("cnn1d:channels=8,hidden=32", (1, 40)),
                                        ("mlp:hidden=[32,16]", (1, 8, 8))])
def test_channel_pruning_removes_channels_physically(spec, shape):
    model = make_model(spec, shape)
    params = sum(p.numel() for p in model.parameters())
    widths = [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]

    prune("channels:ratio=0.5", model, shape)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert sum(p.numel() for p in model.parameters()) < 0.5 * params  # inputs and classes keep their number
    assert [m.weight.shape[0] for m in layers[:-1]] == [w // 2 for w in widths[:-1]]
    assert layers[-1].out_features == 10
    for prev, nxt in zip(layers, layers[1:]):  # attributes agree with the new shapes
        if isinstance(prev, nn.Conv2d) or isinstance(prev, nn.Conv1d):
            assert prev.out_channels == prev.weight.shape[0]
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_channel_pruning_refuses_attention():
    model = make_model("transformer:d_model=16,heads=2,layers=1,ff=16", (1, 40))
    with pytest.raises(CompressError, match="attention"):
        prune("channels:ratio=0.5", model, (1, 40))


def test_tensor_codings_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.8] = 0
    for values, scale in [("fp32", "channel"), ("int8", "channel"), ("int8", "tensor")]:
        record, blob = encode_tensor(w, values=values, scale=scale)
        assert record["coding"] == "mask"
        back, used = decode_tensor(record, memoryview(blob))
        assert used == len(blob)
        assert torch.equal(back == 0, w == 0)  # mask restored exactly
        if values == "fp32":
            assert torch.equal(back, w)
        else:
            rows = w.reshape(16, -1) if scale == "channel" else w.reshape(1, -1)
            step = rows.abs().max(dim=1).values / 127
            assert ((back - w).reshape(rows.shape).abs() <= step[:, None] / 2 + 1e-7).all()
    dense = torch.randn(4, 4, generator=gen)
    record, blob = encode_tensor(dense, values="fp32", scale="channel")
    assert record["coding"] == "dense" and len(blob) == 64
    steps = torch.tensor(7)  # an integer buffer (BatchNorm's num_batches_tracked) is stored raw
    record, blob = encode_tensor(steps, values="int8", scale="channel")
    assert torch.equal(decode_tensor(record, memoryview(blob))[0], steps)


def test_sparse_artefact_round_trip(tmp_path):
    model = make_model("cnn1d:channels=16,hidden=64", (1, 40))
    prune("magnitude:sparsity=0.9", model, (1, 40))
    x = torch.randn(8, 1, 40)
    spec = "cnn1d:channels=16,hidden=64"

    size = save_artefact(tmp_path / "m.shoal", model, model_spec=spec, input_shape=(1, 40), num_classes=10)
    restored = load_artefact(tmp_path / "m.shoal")

    assert size == (tmp_path / "m.shoal").stat().st_size
    assert torch.equal(restored(x), model(x))  # fp32 values: exact
    assert size < state_bytes(model) / 5
    int8 = shoal.compress.ArtefactOptions(values="int8")
    small = save_artefact(tmp_path / "q.shoal", model, model_spec=spec, input_shape=(1, 40), num_classes=10,
                          options=int8)
    assert small < size / 2  # the masks and fp32 biases are the same in both
    assert (load_artefact(tmp_path / "q.shoal")(x) - model(x)).abs().max() < 0.05


def test_artefact_keeps_the_architecture_change(tmp_path):
    spec = "cnn2d:channels=8,hidden=32"
    model = make_model(spec)
    prune("channels:ratio=0.5", model)
    save_artefact(tmp_path / "c.shoal", model, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)

    restored = load_artefact(tmp_path / "c.shoal")

    header, _ = read_artefact(tmp_path / "c.shoal")
    assert header["model"] == spec
    assert restored[0].out_channels == 4 and restored[2].in_channels == 4
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(restored(x), model(x))


def test_onnx_export_matches_pytorch(tmp_path):
    model = make_model("cnn1d:channels=8,hidden=32", (1, 40))
    export_onnx(model, (1, 40), tmp_path / "m.onnx")  # runs onnx.checker
    session = ort_session(tmp_path / "m.onnx")
    for batch in (1, 32):
        x = torch.randn(batch, 1, 40)
        out = ort_run(session, x.numpy())
        assert out.shape == (batch, 10)
        assert np.abs(out - model(x).detach().numpy()).max() < 1e-4


def test_conv1d_exports_as_unit_height_conv2d_with_the_same_logits(tmp_path):
    model = make_model("cnn1d:channels=16,hidden=32", (1, 40))
    prune("channels:ratio=0.5", model, (1, 40))

    export_onnx(model, (1, 40), tmp_path / "m.onnx")  # runs onnx.checker

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert [weights[n.input[1]] for n in convs] == [[8, 1, 1, 5], [16, 8, 1, 3], [16, 16, 1, 3]]
    # One Unsqueeze for the input; the convolutions and ReLUs in between stay 4-D.
    assert [n.op_type for n in graph.node].count("Unsqueeze") == 1
    assert "Squeeze" not in [n.op_type for n in graph.node]
    session = ort_session(tmp_path / "m.onnx")
    for batch in (1, 32):
        x = torch.randn(batch, 1, 40)
        assert np.abs(ort_run(session, x.numpy()) - model(x).detach().numpy()).max() < 1e-4


@pytest.mark.processes
def test_conv1d_rewrite_keeps_the_logits_of_a_mixed_graph(tmp_path):
    class Net(nn.Module):  # BatchNorm, a pool, a dilated grouped conv, a conv output used twice
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 8, 3, padding=1)
            self.norm = nn.BatchNorm1d(8)
            self.b = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=2, stride=2)
            self.c = nn.Conv1d(8, 4, 1, bias=False)
            self.head = nn.Linear(4 * 6, 3)

        def forward(self, x):
            h = F.max_pool1d(torch.relu(self.norm(self.a(x))), 2)
            h = F.gelu(self.b(h))
            return self.head(torch.flatten(self.c(h) + h[:, :4], 1))

    torch.manual_seed(0)
    model = Net().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)

    export_onnx(model, (2, 24), tmp_path / "m.onnx")
    export_onnx(model, (2, 24), tmp_path / "plain.onnx", conv1d_as_2d=False)

    weights = {t.name: len(t.dims) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert all(weights[n.input[1]] == 4 for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv")
    x = torch.randn(5, 2, 24)
    expected = model(x).detach().numpy()
    for name in ("m.onnx", "plain.onnx"):
        assert np.abs(ort_run(ort_session(tmp_path / name), x.numpy()) - expected).max() < 1e-4


def test_conv1d_rewrite_leaves_2d_models_alone(tmp_path):
    model = make_model("cnn2d:channels=4,hidden=16")
    export_onnx(model, (1, 8, 8), tmp_path / "m.onnx", conv1d_as_2d=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    before = proto.SerializeToString()

    assert conv1d_as_conv2d(proto) == 0

    assert proto.SerializeToString() == before


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", {"model": make_model("mlp:hidden=[32]").state_dict()})
    cfg = load_config({"data": {"dataset": "digits"}, "model": "mlp:hidden=[16]"})
    with pytest.raises(CompressError, match=r"does not match the config's model 'mlp:hidden=\[16\]'.*1.weight"):
        load_trained(cfg, run)
    with pytest.raises(CompressError, match="no checkpoint.pt"):
        load_trained(cfg, tmp_path)


def test_bad_specs_are_refused_before_any_work(tmp_path):
    cfg = {"data": {"dataset": "digits"}, "model": "mlp:hidden=[16]"}
    with pytest.raises(CompressError, match="sparsity"):
        shoal.compress(cfg, checkpoint=tmp_path, prune="magnitude:sparsity=1.5", out=tmp_path / "o")
    with pytest.raises(CompressError, match="unknown quantizer 'int4'"):
        shoal.compress(cfg, checkpoint=tmp_path, quantize="int4", out=tmp_path / "o")
    with pytest.raises(CompressError, match="values"):
        shoal.compress(cfg, checkpoint=tmp_path, artefact="sparse:values=int3", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.processes
def test_compress_api_reports_every_quantisation(tmp_path):
    run = digits_run(tmp_path / "run")

    report = shoal.compress(run / "config.yaml", checkpoint=run, prune="magnitude:sparsity=0.8",
                            quantize=["int8-static", "int8-dynamic", "fp16"], artefact="sparse:values=int8",
                            out=tmp_path / "out", repeats=3)

    assert [r.name for r in report.rows] == ["uncompressed", "compressed", "int8-static", "int8-dynamic", "fp16"]
    base, comp = report.rows[0], report.rows[1]
    assert base.accuracy > 0.85 and abs(base.accuracy - base.torch_accuracy) < 1e-9
    assert base.max_abs_diff < 1e-4 and comp.max_abs_diff < 1e-4  # ONNX parity
    assert comp.nonzero_parameters < 0.25 * comp.parameters
    assert comp.artefact_bytes < base.artefact_bytes / 10
    for row in report.rows:
        assert row.latency_ms_batch1 > 0 and row.latency_ms_batch32 > row.latency_ms_batch1 / 2
        assert row.accuracy > base.accuracy - 0.1, row.name
        assert (tmp_path / "out" / row.onnx).is_file()
    assert report.rows[4].onnx_bytes < 0.7 * comp.onnx_bytes  # fp16 halves the weights (not the graph)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"][2]["spec"].endswith("int8-static:batches=8,batch_size=32,per_channel=True,method=minmax")
    assert saved["threads"] == 1 and saved["versions"]["onnxruntime"]


def test_an_artefact_for_other_data_is_refused(tmp_path):
    from shoal.models.artefact_file import save_artefact
    from shoal.models.artefact import load_artefact
    from torch import nn

    save_artefact(tmp_path / "m.shoal", nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), model_spec="mlp:hidden=[]",
                  input_shape=(1, 8, 8), num_classes=10)
    assert load_artefact(tmp_path / "m.shoal", input_shape=(1, 8, 8), num_classes=10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"takes inputs \(1, 8, 8\) and 10 classes; the dataset has \(1, 40\)"):
        load_artefact(tmp_path / "m.shoal", input_shape=(1, 40), num_classes=10)
