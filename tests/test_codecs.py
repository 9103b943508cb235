"""Each codec alone: round-trip error within its stated bound, wire bytes = payload bytes."""

import math

import pytest
import torch

from shoal.comm import bitpack
from shoal.comm.codecs import build_codec
from shoal.comm.memory import ErrorFeedback
from shoal.registry import CODECS, load_builtins

load_builtins()


def codec(spec, rank=0):
    return build_codec(CODECS.resolve(spec), rank=rank)


@pytest.fixture
def grad():
    return torch.randn(10_001, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bitpack_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(bitpack.unpack(packed, bits, 1001), codes)


def test_none_is_exact(grad):
    c = codec("none")
    payload = c.encode(grad)
    assert torch.equal(c.decode(payload), grad) and payload.wire_bytes == grad.numel() * 4


@pytest.mark.parametrize("spec, rel_bound, bytes_per_value", [("fp16", 1e-3, 2), ("bf16", 8e-3, 2)])
def test_half_precision(grad, spec, rel_bound, bytes_per_value):
    c = codec(spec)
    payload = c.encode(grad)
    out = c.decode(payload)
    assert out.dtype == torch.float32 and payload.wire_bytes == grad.numel() * bytes_per_value
    assert ((out - grad).abs() <= rel_bound * grad.abs() + 1e-6).all()


def test_int8_error_at_most_half_a_step(grad):
    c = codec("int8")
    payload = c.encode(grad)
    scale = grad.abs().max() / 127
    assert (c.decode(payload) - grad).abs().max() <= scale / 2 + 1e-6
    assert payload.wire_bytes == grad.numel() + 4


def test_signsgd_one_bit_per_value(grad):
    c = codec("signsgd")
    payload = c.encode(grad)
    out = c.decode(payload)
    assert payload.wire_bytes == math.ceil(grad.numel() / 8) + 4
    assert torch.equal(torch.sign(out), torch.where(grad >= 0, 1.0, -1.0))
    assert out.abs().mean() == pytest.approx(grad.abs().mean().item(), rel=1e-5)


@pytest.mark.processes
@pytest.mark.parametrize("spec", ["terngrad", "qsgd:levels=7", "qsgd:levels=16", "qsgd:levels=1",
                                  "terngrad:bucket=100", "qsgd:levels=7,bucket=100"])
def test_stochastic_quantisers_are_unbiased(spec):
    g = torch.randn(512, generator=torch.Generator().manual_seed(1))
    c = codec(spec)
    mean = torch.stack([c.decode(c.encode(g)) for _ in range(4000)]).mean(0)
    if spec.startswith("terngrad"):
        scale = g.abs().max()
    else:
        scale = g.norm() / int(spec.split("levels=")[1].split(",")[0])
    assert (mean - g).abs().max() < 0.1 * scale  # ~5 sigma of the Monte-Carlo error


def test_quantiser_wire_bytes(grad):
    n = grad.numel()
    assert codec("terngrad").encode(grad).wire_bytes == math.ceil(n / 4) + 4
    assert codec("qsgd:levels=7").encode(grad).wire_bytes == math.ceil(n / 2) + 4
    assert codec("qsgd:levels=100").encode(grad).wire_bytes == n + 4
    assert codec("qsgd:levels=1").encode(grad).wire_bytes == math.ceil(n / 4) + 4  # sign + 1 level bit


@pytest.mark.parametrize("spec, bits", [("terngrad:bucket=512", 2), ("qsgd:levels=7,bucket=512", 4),
                                        ("qsgd:levels=1,bucket=512", 2), ("qsgd:levels=100,bucket=512", 8)])
def test_bucketed_wire_bytes_count_one_fp32_scale_per_bucket(grad, spec, bits):
    n = grad.numel()  # 10,001 = 19 full buckets of 512 and one of 273
    payload = codec(spec).encode(grad)
    assert payload.tensors[1].numel() == 20 and payload.tensors[1].dtype == torch.float32
    assert payload.wire_bytes == math.ceil(n * bits / 8) + 20 * 4
    assert payload.to_bytes().numel() == payload.wire_bytes


@pytest.mark.parametrize("spec", ["terngrad:bucket=512", "qsgd:levels=7,bucket=512"])
def test_bucketed_payload_decodes_from_a_template_of_zeros(grad, spec):
    # What a federated server does: the layout comes from encoding zeros of the same size.
    sender, receiver = codec(spec, rank=3), codec(spec)
    payload = sender.encode(grad)
    template = receiver.encode(torch.zeros_like(grad))
    received = template.from_bytes(payload.to_bytes())
    assert torch.equal(receiver.decode(received), sender.decode(payload))


def test_terngrad_bucket_scale_is_its_own_largest_value():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    g[:100] *= 100  # one loud bucket must not set the others' scale
    out = codec("terngrad:bucket=100").decode(codec("terngrad:bucket=100").encode(g))
    for start in range(0, 1000, 100):
        bucket, decoded = g[start:start + 100], out[start:start + 100]
        assert set(decoded.abs().unique().tolist()) <= {0.0, bucket.abs().max().item()}
        assert (torch.sign(decoded) * torch.sign(bucket) >= 0).all()


@pytest.mark.processes
@pytest.mark.parametrize("spec", ["terngrad:bucket=64", "qsgd:levels=7,bucket=64"])
def test_a_zero_bucket_and_a_short_last_bucket(spec):
    g = torch.randn(64 * 3 + 5, generator=torch.Generator().manual_seed(3))
    g[64:128] = 0
    c = codec(spec)
    out = c.decode(c.encode(g))
    assert out.shape == g.shape and torch.isfinite(out).all()
    assert (out[64:128] == 0).all()
    mean = torch.stack([c.decode(c.encode(g)) for _ in range(4000)]).mean(0)
    assert (mean[-5:] - g[-5:]).abs().max() < 0.1 * g[-5:].abs().max()  # the 5-value bucket is unbiased too


@pytest.mark.parametrize("name", ["terngrad", "qsgd:levels=7"])
def test_a_bucket_at_least_the_tensor_is_one_scale(grad, name):
    sep = "," if ":" in name else ":"
    whole, big = codec(name), codec(f"{name}{sep}bucket={grad.numel()}")
    a, b = whole.encode(grad), big.encode(grad)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


def test_qsgd_buckets_cut_the_variance_on_a_heavy_tailed_change():
    g = torch.randn(8192, generator=torch.Generator().manual_seed(4)) ** 5
    def error(spec):
        c = codec(spec)
        return torch.stack([((c.decode(c.encode(g)) - g) ** 2).sum() for _ in range(20)]).mean()
    d, s = 256, 7
    bucketed = error(f"qsgd:levels={s},bucket={d}")
    assert bucketed <= min(d / s**2, math.sqrt(d) / s) * (g**2).sum()  # the bound with d in place of n
    assert bucketed < 0.5 * error(f"qsgd:levels={s}")


def test_qsgd_variance_bound(grad):
    c = codec("qsgd:levels=7")
    errors = [((c.decode(c.encode(grad)) - grad) ** 2).sum() for _ in range(20)]
    n, s = grad.numel(), 7
    assert torch.stack(errors).mean() <= min(n / s**2, math.sqrt(n) / s) * (grad**2).sum()


@pytest.mark.parametrize("sample", [0.0, 0.05])
def test_topk_keeps_the_largest_values(grad, sample):
    c = codec(f"topk:ratio=0.01,sample={sample}")
    payload = c.encode(grad)
    k = round(0.01 * grad.numel())
    out = c.decode(payload)
    kept = out != 0
    assert kept.sum() == k
    assert torch.equal(out[kept], grad[kept])
    threshold = grad.abs().topk(k).values.min()
    assert (grad[kept].abs() >= threshold).all()
    assert payload.tensors[1].dtype == torch.int16  # 10,001 values: 2-byte indices
    assert payload.wire_bytes == k * (4 + 2)


@pytest.mark.parametrize("values, positions, bytes_per_k, bitmap_bytes", [
    ("fp32", "bitmap", 4, math.ceil(10_001 / 8)), ("fp16", "bitmap", 2, math.ceil(10_001 / 8)),
    ("fp16", "index", 2 + 2, 0)])
def test_topk_compact_layouts_keep_the_same_values(grad, values, positions, bytes_per_k, bitmap_bytes):
    plain = codec("topk:ratio=0.15")
    compact = codec(f"topk:ratio=0.15,values={values},positions={positions}")
    payload = compact.encode(grad)
    k = round(0.15 * grad.numel())
    assert payload.wire_bytes == k * bytes_per_k + bitmap_bytes
    out, expected = compact.decode(payload), plain.decode(plain.encode(grad))
    assert out.dtype == torch.float32 and torch.equal(out != 0, expected != 0)
    rel = 1e-3 if values == "fp16" else 0.0
    assert ((out - expected).abs() <= rel * expected.abs()).all()
    template = compact.encode(torch.zeros_like(grad))  # a server's layout: from zeros of the same size
    assert torch.equal(compact.decode(template.from_bytes(payload.to_bytes())), out)


def test_topk_fp16_values_saturate_instead_of_overflowing():
    g = torch.tensor([1e6, -1e6, 1.0, 0.5])
    c = codec("topk:ratio=0.5,values=fp16")
    out = c.decode(c.encode(g))
    assert torch.isfinite(out).all() and out[0] == torch.finfo(torch.float16).max and out[1] == -out[0]


def test_topk_bitmap_with_the_wrong_count_is_refused(grad):
    c = codec("topk:ratio=0.15,positions=bitmap")
    payload = c.encode(grad)
    payload.tensors[1][0] ^= 0xFF  # flips eight positions: the count no longer matches k
    with pytest.raises(ValueError, match="bitmap marks"):
        c.decode(payload)


def test_randk_positions_agree_across_workers_and_only_values_travel(grad):
    a, b = codec("randk:ratio=0.05", rank=0), codec("randk:ratio=0.05", rank=1)
    pa, pb = a.encode(grad), b.encode(grad * 2)
    assert torch.equal(pa.ctx["idx"], pb.ctx["idx"])
    assert pa.wire_bytes == round(0.05 * grad.numel()) * 4 and len(pa.tensors) == 1
    assert torch.equal(a.decode(pa)[pa.ctx["idx"]], grad[pa.ctx["idx"]])


def test_payload_bytes_round_trip(grad):
    c = codec("topk:ratio=0.01")
    payload = c.encode(grad)
    again = payload.from_bytes(payload.to_bytes())
    assert torch.equal(c.decode(again), c.decode(payload))
    assert payload.to_bytes().numel() == payload.wire_bytes


def test_error_feedback_carries_the_residual(grad):
    c, memory = codec("topk:ratio=0.01"), ErrorFeedback()
    sent = torch.zeros_like(grad)
    norms = []
    for step in range(1, 601):
        compensated = memory.compensate(0, grad)
        decoded = c.decode(c.encode(compensated))
        memory.update(0, compensated, decoded)
        sent += decoded
        if step in (300, 600):
            norms.append(memory.residuals[0].norm())
    # Nothing is lost: what went out plus what is held back is every gradient.
    torch.testing.assert_close(sent + memory.residuals[0], 600 * grad, rtol=1e-4, atol=1e-2)
    # And what is held back stays bounded, so the average sent converges to the gradient.
    assert norms[1] <= 1.2 * norms[0]


@pytest.mark.parametrize("spec", ["topk:ratio=0", "qsgd:levels=0", "qsgd:bucket=-1", "terngrad:bucket=-512",
                                  "topk:values=int8", "topk:positions=delta", "powersgd:rank=0", "randk:ratio=2", "fp16:memory=maybe"])
def test_bad_codec_options_are_rejected(spec):
    with pytest.raises(ValueError):
        CODECS.resolve(spec)


def test_sampled_topk_rarely_needs_the_exact_fallback(monkeypatch):
    # Regression: a threshold taken at the sample's k-th value gave too few
    # candidates half the time, and the fallback made "sampled" slower than exact.
    from shoal.comm.codecs import topk as topk_module

    def no_fallback(*_):
        raise AssertionError("fell back to exact topk")

    monkeypatch.setattr(topk_module, "topk_select", no_fallback)
    for seed in range(20):
        flat = torch.randn(200_000, generator=torch.Generator().manual_seed(seed))
        idx = topk_module.sampled_topk_select(flat, 200, 0.01, torch.Generator().manual_seed(seed))
        assert idx.numel() == 200 and idx.unique().numel() == 200


class _OneWorker:
    world_size = 1

    def all_gather(self, tensor, dense_numel=0):
        return tensor.unsqueeze(0)


def test_threshold_sends_exactly_the_values_past_tau(grad):
    c = codec("threshold:tau=1.5")
    result, local = c.exchange(0, grad, _OneWorker())
    kept = grad.abs() >= 1.5
    assert torch.equal(result[kept], grad[kept]) and (result[~kept] == 0).all()
    assert torch.equal(local, result)


class _OneWorkerSum(_OneWorker):
    def __init__(self):
        self.sent = []

    def all_reduce(self, tensor, dense_numel=0):
        self.sent.append(tensor.numel())
        return tensor


def test_powersgd_compresses_each_matrix_on_its_own():
    # A rank-2 weight matrix and a bias, concatenated as in a DDP bucket: given
    # the shapes, rank 2 recovers the matrix exactly and sends the bias as it is.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 2, generator=gen) @ torch.randn(2, 60, generator=gen)
    bias = torch.randn(40, generator=gen)
    flat = torch.cat([weight.reshape(-1), bias])
    comm = _OneWorkerSum()
    result, _ = codec("powersgd:rank=2").exchange(0, flat, comm, shapes=[weight.shape, bias.shape])
    torch.testing.assert_close(result, flat, rtol=1e-4, atol=1e-4)
    assert comm.sent == [40, 40 * 2, 60 * 2]  # the bias, then P, then Q
    # Without shapes the same bytes are one padded near-square matrix: no longer exact.
    whole, _ = codec("powersgd:rank=2").exchange(0, flat, _OneWorkerSum())
    assert (whole - flat).norm() / flat.norm() > 0.05
