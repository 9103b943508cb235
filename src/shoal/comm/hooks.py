"""Sending a tensor through a codec across workers: a DDP communication hook
for gradient buckets, and a blocking form for anything else (model deltas).

The hook follows the shape of PyTorch's ``ddp_comm_hooks``: a state object plus
a plain function ``hook(state, bucket) -> Future[Tensor]``, so DDP keeps its
bucketing and backward overlap, and cross-cutting features wrap the exchange
as ``fp16_compress_wrapper`` wraps a hook (GRACE's compressor / memory /
communicator split). Per bucket:

1. residuals follow their parameters when DDP regroups its buckets
   (:mod:`shoal.comm.residual_layout`)
2. mask packing (sparse training): only the kept entries go on (:func:`_with_mask_packing`)
3. error feedback (``memory=ef``): compensate with the residual, and keep what
   the local payload did not carry (:func:`_with_error_feedback`)
4. the codec exchange proper (:func:`_codec_exchange`): encode, one collective
   (summable payloads all-reduced, others' bytes all-gathered), decode, average;
   codecs with several dependent rounds (PowerSGD, threshold) run them inside
   the call, blocking, so every rank issues its collectives in the same order.
   Every collective is metered (:class:`shoal.comm.metered.MeteredComm`).
"""

# No "from __future__ import annotations": DDP checks the hook's real annotations.
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
import torch.distributed as dist

from shoal.comm.codecs.base import Codec
from shoal.comm.memory import ErrorFeedback
from shoal.comm.metered import LocalComm, MeteredComm
from shoal.comm.residual_layout import adopt_restored, follow_layout, residuals_by_parameter, restore_residuals
from shoal.comm.wire import WireMeter

__all__ = ["CodecHookState", "LocalComm", "codec_hook", "exchange", "kept_entries", "local_gradient_hook",
           "residuals_by_parameter", "restore_residuals"]

# LocalComm, residuals_by_parameter and restore_residuals are imported from here by other
# modules; the residual re-layout also under the names it had when it lived here (tests).
_adopt_restored, _follow_layout = adopt_restored, follow_layout


class CodecHookState:
    __slots__ = ("codec", "meter", "group", "world_size", "memory", "masks", "packed", "layouts", "restored")

    def __init__(self, codec: Codec, meter: WireMeter, group: "dist.ProcessGroup | None" = None):
        self.codec = codec
        self.meter = meter
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.memory = ErrorFeedback() if codec.options.memory == "ef" else None
        # Sparse training (shoal.engine.sparsity.SparsityController): only the
        # gradients of kept weights are sent. Per bucket: (its parameters, mask
        # version, indices of the kept entries in its buffer).
        self.masks: Any = None
        self.packed: dict[int, tuple[tuple[int, ...], int, torch.Tensor]] = {}
        # Each bucket's parameters as last seen, and residuals restored per
        # parameter that wait for the bucket they now belong to (shoal.comm.residual_layout).
        self.layouts: dict[int, list[torch.Tensor]] = {}
        self.restored: dict[int, torch.Tensor] = {}  # id(parameter) -> its dense residual


class _Pending(Protocol):
    """An exchange on its way: ``result()``, the mean over workers, once ``future`` has completed."""

    future: torch.futures.Future

    def result(self) -> torch.Tensor: ...


# Told (what was encoded, what this worker's payload decodes to), both in the input's units.
OnEncoded = Callable[[torch.Tensor, torch.Tensor], None]
Exchange = Callable[..., _Pending]


class _Round:
    """One round of the codec exchange: encode, ONE collective in flight, decode when it lands."""

    def __init__(self, state: CodecHookState, tensor: torch.Tensor, dense_numel: int | None = None,
                 on_encoded: OnEncoded | None = None):
        self.state, self.like = state, tensor
        self.comm = MeteredComm(state.meter, state.group, state.world_size)
        dense = tensor.numel() if dense_numel is None else dense_numel  # what fp32 all-reduce would send
        codec, world = state.codec, state.world_size
        if codec.capabilities.summable:
            # Scale before the sum, as DDP's own hook does: no overflow in low
            # precision. In place, the hot path: ``tensor`` is the bucket (ours to
            # change), its packed entries, or a fresh compensated tensor.
            scaled = tensor.div_(world)
            self.payload = codec.encode(scaled)
            if on_encoded is not None:  # before the all-reduce sums the payload in place
                on_encoded(scaled * world, codec.decode(self.payload) * world)
            self.started, self.future = self.comm.start_all_reduce(self.payload.tensors, dense)
        else:
            self.payload = codec.encode(tensor)
            if on_encoded is not None:
                on_encoded(tensor, codec.decode(self.payload))
            send = self.payload.to_bytes()
            self.gathered = send.new_empty(world * send.numel())
            self.started, self.future = self.comm.start_all_gather(self.gathered, send, dense)

    def result(self) -> torch.Tensor:
        """The mean over workers, once the collective has completed."""
        state = self.state
        self.comm.done(self.started)
        if state.codec.capabilities.summable:
            return state.codec.decode(self.payload).view_as(self.like)
        total = torch.zeros_like(self.like)
        for part in self.gathered.view(state.world_size, -1):
            total += state.codec.decode(self.payload.from_bytes(part)).view_as(self.like)
        return total.div_(state.world_size)


class _Landed:
    """An exchange already complete (a multi-round codec's, a bucket with nothing to send)."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self.future.set_result(value)

    def result(self) -> torch.Tensor:
        return self.value


def _codec_exchange(state: CodecHookState, name: int, tensor: torch.Tensor, *, shapes=None,
                    dense_numel: int | None = None, on_encoded: OnEncoded | None = None) -> _Pending:
    """The codec exchange proper: one round, or a multi-round codec's own (blocking)."""
    if not state.codec.capabilities.multi_round:
        return _Round(state, tensor, dense_numel, on_encoded)
    comm = MeteredComm(state.meter, state.group, state.world_size)
    result, local = state.codec.exchange(name, tensor, comm, shapes=shapes)
    if on_encoded is not None:
        on_encoded(tensor, local)
    return _Landed(result)


def _with_error_feedback(exchange: Exchange) -> Exchange:
    """``exchange`` with error feedback (Seide et al. 2014; Karimireddy et al. 2019):

    1. compensate: add the residual left by the tensor's last exchange
    2. exchange the sum
    3. the new residual: the sum minus what this worker's payload decodes to"""

    def with_memory(state: CodecHookState, name: int, tensor: torch.Tensor, **options: Any) -> _Pending:
        memory = state.memory
        compensated = memory.compensate(name, tensor)
        return exchange(state, name, compensated, on_encoded=partial(memory.update, name), **options)

    return with_memory


def _exchange_of(state: CodecHookState) -> Exchange:
    """The codec exchange, with error feedback around it when the codec's options ask (``memory=ef``)."""
    return _codec_exchange if state.memory is None else _with_error_feedback(_codec_exchange)


def exchange(state: CodecHookState, name: int, tensor: torch.Tensor, shapes=None,
             dense_numel: int | None = None) -> torch.Tensor:
    """Blocking: the mean over workers of ``tensor``, sent through the codec.

    ``shapes``: the tensors ``tensor`` concatenates, for codecs that treat
    each one apart (PowerSGD's matrices). ``dense_numel``: the entries fp32
    all-reduce would have sent, when ``tensor`` is a packed part of them."""
    pending = _exchange_of(state)(state, name, tensor, shapes=shapes, dense_numel=dense_numel)
    pending.future.wait()
    return pending.result()


def kept_entries(state: CodecHookState, bucket: dist.GradBucket) -> torch.Tensor | None:
    """Indices of the bucket's entries whose weights are not pruned (None: send it all)."""
    return packed_entries(state, bucket.index(), bucket.parameters(), bucket.buffer().numel())


def packed_entries(state: CodecHookState, name: int, params: list[torch.Tensor], numel: int) -> torch.Tensor | None:
    """Indices of the entries of ``params``' flat gradient (``numel`` of them, sent
    under ``name``) whose weights are not pruned; None without masks.

    Rebuilt when the masks change or the parameters regroup; an error-feedback
    residual is carried over to the new packing."""
    masks = state.masks
    if masks is None or not masks.masks:
        return None
    ids = tuple(id(p) for p in params)
    cached = state.packed.get(name)
    if cached is not None and cached[0] == ids and cached[1] == masks.version:
        return cached[2]
    keep = masks.flat_mask(params).nonzero().squeeze(1)
    if state.memory is not None:
        old = cached[2] if cached is not None and cached[0] == ids else None
        state.memory.repack(name, old, keep, numel)
    state.packed[name] = (ids, masks.version, keep)
    return keep


class _Scattered:
    """The exchange of a bucket's kept entries, its result the whole bucket: zeros elsewhere."""

    def __init__(self, kept: _Pending, grad: torch.Tensor, keep: torch.Tensor):
        self.kept, self.grad, self.keep = kept, grad, keep
        self.future = kept.future

    def result(self) -> torch.Tensor:
        mean = self.kept.result()
        # In the bucket's own buffer: layout.unpack would build another dense vector
        # (and count the mask's entries, a device sync per bucket).
        return self.grad.zero_().index_put_((self.keep,), mean)


def _with_mask_packing(exchange: Exchange) -> Callable[..., _Pending]:
    """``exchange`` of a bucket's kept entries only (``keep``, from :func:`kept_entries`;
    None: all of them): the pruned weights' part of the mean is zero."""

    def kept_only(state: CodecHookState, name: int, grad: torch.Tensor, keep: torch.Tensor | None) -> _Pending:
        if keep is None:
            return exchange(state, name, grad)
        if not keep.numel():  # every weight in it pruned, on every rank (one mask): nothing to send
            return _Landed(grad.zero_())
        return _Scattered(exchange(state, name, grad[keep], dense_numel=grad.numel()), grad, keep)

    return kept_only


def _into(grad: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    if result.data_ptr() != grad.data_ptr():
        grad.copy_(result)
    return grad


def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    name, grad, params = bucket.index(), bucket.buffer(), bucket.parameters()
    follow_layout(state, name, params)
    if state.codec.capabilities.multi_round:  # its rounds cut the bucket at the parameters: sent whole
        adopt_restored(state, name, params, None)
        pending = _exchange_of(state)(state, name, grad, shapes=[p.shape for p in params])
    else:
        keep = kept_entries(state, bucket)
        adopt_restored(state, name, params, keep)
        pending = _with_mask_packing(_exchange_of(state))(state, name, grad, keep)
    # The collective's own value is not read: the round decodes what landed in its buffers.
    return pending.future.then(lambda _: _into(grad, pending.result()))


def local_gradient_hook(_: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No communication at all: each worker keeps its own gradient (compute-only baseline)."""
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done
