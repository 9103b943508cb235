"""The DDP codec hook's parts on their own: the error-feedback and mask-packing
wrappers around a stand-in exchange, the residual re-layout, and the codec
exchange with its metering in a one-worker gloo group."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from shoal.comm import residual_layout
from shoal.comm.codecs import build_codec
from shoal.comm.hooks import CodecHookState, _Landed, _with_error_feedback, _with_mask_packing, exchange
from shoal.comm.memory import ErrorFeedback
from shoal.comm.wire import WireMeter
from shoal.registry import CODECS, load_builtins


def _halving_exchange(calls):
    """A stand-in exchange: this worker's payload decodes to half its input, and so does the mean."""
    def exchanged(state, name, tensor, *, dense_numel=None, on_encoded=None):
        calls.append((tensor.clone(), dense_numel))
        if on_encoded is not None:
            on_encoded(tensor, tensor / 2)
        return _Landed(tensor / 2)
    return exchanged


def test_error_feedback_adds_back_what_the_last_exchange_did_not_carry():
    state, calls = SimpleNamespace(memory=ErrorFeedback()), []
    with_memory = _with_error_feedback(_halving_exchange(calls))

    with_memory(state, 0, torch.tensor([4.0, 2.0]))
    second = with_memory(state, 0, torch.tensor([4.0, 2.0])).result()

    assert calls[1][0].tolist() == [6.0, 3.0]  # compensated: the input plus the residual [2, 1]
    assert second.tolist() == [3.0, 1.5]
    assert state.memory.residuals[0].tolist() == [3.0, 1.5]


def test_mask_packing_sends_the_kept_entries_and_zeros_the_rest_in_the_bucket():
    calls, grad = [], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kept_only = _with_mask_packing(_halving_exchange(calls))

    result = kept_only(None, 0, grad, torch.tensor([1, 3])).result()

    assert calls[0][0].tolist() == [2.0, 4.0] and calls[0][1] == 5  # metered as the dense bucket
    assert result.data_ptr() == grad.data_ptr()
    assert grad.tolist() == [0.0, 1.0, 0.0, 2.0, 0.0]


def test_a_bucket_with_every_weight_pruned_sends_nothing():
    calls, grad = [], torch.ones(3)

    pending = _with_mask_packing(_halving_exchange(calls))(None, 0, grad, torch.tensor([], dtype=torch.long))

    assert not calls and pending.future.done()
    assert pending.result().tolist() == [0.0, 0.0, 0.0]


def test_a_packed_residual_is_cut_per_parameter_dense_and_packed_again_for_its_bucket():
    a, b = torch.zeros(2), torch.zeros(3)
    keep = torch.tensor([0, 2, 4])
    state = SimpleNamespace(memory=ErrorFeedback(), packed={0: ((id(a), id(b)), 1, keep)}, layouts={0: [a, b]},
                            restored={})
    state.memory.residuals[0] = torch.tensor([1.0, 2.0, 3.0])

    parts = residual_layout.split_residual(state, 0)
    state.memory.residuals.clear()
    state.restored = dict(parts)
    residual_layout.adopt_restored(state, 0, [a, b], keep)

    assert parts[id(a)].tolist() == [1.0, 0.0] and parts[id(b)].tolist() == [2.0, 0.0, 3.0]
    assert state.memory.residuals[0].tolist() == [1.0, 2.0, 3.0] and not state.restored


@pytest.fixture
def one_worker():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    load_builtins()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("spec, collectives", [("topk:ratio=0.25", 1), ("fp16", 1), ("threshold:tau=0.5", 2)])
def test_every_collective_of_an_exchange_is_metered(one_worker, spec, collectives):
    state = CodecHookState(build_codec(CODECS.resolve(spec)), WireMeter())
    tensor = torch.linspace(-1.0, 1.0, 16)
    payload = state.codec.encode(tensor.clone()) if not state.codec.capabilities.multi_round else None

    exchange(state, 0, tensor.clone(), dense_numel=64)
    stats = state.meter.take()

    assert stats.collectives == collectives
    if payload is not None:  # one round: the payload's bytes, against the dense tensor it stands for
        assert stats.wire_bytes == payload.wire_bytes and stats.dense_bytes == 64 * 4


def test_error_feedback_through_the_exchange_keeps_what_top_k_dropped(one_worker):
    state = CodecHookState(build_codec(CODECS.resolve("topk:ratio=0.25,memory=ef")), WireMeter())
    tensor = torch.tensor([4.0, -1.0, 0.5, 0.25])

    mean = exchange(state, 0, tensor.clone())

    assert mean.tolist() == [4.0, 0.0, 0.0, 0.0]
    assert state.memory.residuals[0].tolist() == [0.0, -1.0, 0.5, 0.25]
