"""Sending a tensor through a codec across workers: a DDP communication hook
for gradient buckets, and a blocking form for anything else (model deltas).

The hook follows the shape of PyTorch's ``ddp_comm_hooks``: a state object plus
a plain function ``hook(state, bucket) -> Future[Tensor]``, so DDP keeps its
bucketing and backward overlap. Per tensor:

1. compensate with the error-feedback residual (``memory=ef``)
2. encode; what the local payload decodes to updates the residual
3. summable payloads: all-reduce each tensor, decode the sum, divide by N;
   others: all-gather the payload's bytes in one collective, decode each
   worker's payload, average
4. codecs with several dependent rounds (PowerSGD, threshold) run them inside the call,
   blocking, so every rank issues its collectives in the same order
"""

# No "from __future__ import annotations": DDP checks the hook's real annotations.
from typing import Any

import torch
import torch.distributed as dist

from shoal.comm.codecs.base import Codec
from shoal.comm.memory import ErrorFeedback
from shoal.comm.wire import WireMeter


class CodecHookState:
    __slots__ = ("codec", "meter", "group", "world_size", "memory", "masks", "packed", "layouts", "restored")

    def __init__(self, codec: Codec, meter: WireMeter, group: "dist.ProcessGroup | None" = None):
        self.codec = codec
        self.meter = meter
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.memory = ErrorFeedback() if codec.options.memory == "ef" else None
        # Sparse training (shoal.training.sparsity.SparsityController): only the
        # gradients of kept weights are sent. Per bucket: (its parameters, mask
        # version, indices of the kept entries in its buffer).
        self.masks: Any = None
        self.packed: dict[int, tuple[tuple[int, ...], int, torch.Tensor]] = {}
        # Each bucket's parameters as last seen, and residuals restored per
        # parameter that wait for the bucket they now belong to: DDP orders a
        # bucket's parameters one way in its first step and another after it
        # rebuilds its buckets, so a checkpoint keeps residuals by parameter.
        self.layouts: dict[int, list[torch.Tensor]] = {}
        self.restored: dict[int, torch.Tensor] = {}  # id(parameter) -> its dense residual


def _split_residual(state: CodecHookState, bucket: int) -> dict[int, torch.Tensor]:
    """A bucket's residual cut per parameter of its last layout, dense (pruned entries zero), by id."""
    residual, params = state.memory.residuals.get(bucket), state.layouts.get(bucket)
    if residual is None or params is None:
        return {}
    numel = sum(p.numel() for p in params)
    packed = state.packed.get(bucket)
    if packed is not None and packed[0] == tuple(id(p) for p in params) and residual.numel() == packed[2].numel() != numel:
        residual = residual.new_zeros(numel).index_put_((packed[2],), residual)
    if residual.numel() != numel:
        return {}  # a stale one
    return {id(p): part.clone() for p, part in zip(params, residual.detach().split([p.numel() for p in params]))}


def residuals_by_parameter(state: CodecHookState, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """The error-feedback residuals cut per parameter, dense (pruned entries zero), by name."""
    out: dict[str, torch.Tensor] = {}
    if state.memory is None:
        return out
    for bucket in state.memory.residuals:
        out.update({names[pid]: part.cpu() for pid, part in _split_residual(state, bucket).items()})
    for pid, residual in state.restored.items():  # restored, not yet used: kept as they came
        out.setdefault(names[pid], residual.cpu())
    return out


def _follow_layout(state: CodecHookState, name: int, params: list[torch.Tensor]) -> None:
    """DDP regrouped its buckets (after its first step): every residual is cut per parameter
    by the layout it was made in, and each bucket puts its own together again when it runs
    (a parameter may have moved to a bucket that runs earlier)."""
    before = state.layouts.get(name)
    if before is not None and state.memory is not None and [id(p) for p in before] != [id(p) for p in params]:
        for bucket in list(state.memory.residuals):
            state.restored.update(_split_residual(state, bucket))
        state.memory.residuals.clear()
        state.packed.clear()
    state.layouts[name] = params


def restore_residuals(state: CodecHookState, saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Residuals saved by :func:`residuals_by_parameter`, each bucket's put together when it first runs."""
    state.restored = {id(params[name]): residual for name, residual in saved.items() if name in params}
    if state.memory is not None:
        state.memory.residuals.clear()


def _adopt_restored(state: CodecHookState, name: int, params: list[torch.Tensor], keep: torch.Tensor | None) -> None:
    if state.memory is None or not state.restored or not any(id(p) in state.restored for p in params):
        return
    parts = [state.restored.pop(id(p), None) for p in params]
    dense = torch.cat([part.to(p.device).reshape(-1) if part is not None else p.new_zeros(p.numel())
                       for part, p in zip(parts, params)])
    state.memory.residuals[name] = dense if keep is None else dense[keep]


def kept_entries(state: CodecHookState, bucket: dist.GradBucket) -> torch.Tensor | None:
    """Indices of the bucket's entries whose weights are not pruned (None: send it all).

    Rebuilt when the masks change or DDP regroups its buckets; an error-feedback
    residual is carried over to the new packing."""
    masks = state.masks
    if masks is None or not masks.masks:
        return None
    name, params = bucket.index(), bucket.parameters()
    ids = tuple(id(p) for p in params)
    cached = state.packed.get(name)
    if cached is not None and cached[0] == ids and cached[1] == masks.version:
        return cached[2]
    keep = masks.flat_mask(params).nonzero().squeeze(1)
    if state.memory is not None:
        old = cached[2] if cached is not None and cached[0] == ids else None
        state.memory.repack(name, old, keep, bucket.buffer().numel())
    state.packed[name] = (ids, masks.version, keep)
    return keep


class _Round:
    """One encoded tensor on its way: the collective in flight and how to finish it."""

    def __init__(self, state: CodecHookState, name: int, tensor: torch.Tensor, dense_numel: int | None = None):
        self.state, self.like = state, tensor
        dense = tensor.numel() if dense_numel is None else dense_numel  # what fp32 all-reduce would send
        codec, world, memory = state.codec, state.world_size, state.memory
        compensated = memory.compensate(name, tensor) if memory is not None else tensor
        if codec.capabilities.summable:
            # Scale before the sum, as DDP's own hook does: no overflow in low
            # precision. In place: ``compensated`` is the bucket (ours to change)
            # or a fresh tensor from the memory.
            scaled = compensated.div_(world)
            self.payload = codec.encode(scaled)
            if memory is not None:
                compensated, local = scaled * world, codec.decode(self.payload) * world
            self.started = state.meter.sent(self.payload.tensors, dense)
            futures = [dist.all_reduce(t, group=state.group, async_op=True).get_future() for t in self.payload.tensors]
            # One payload tensor (fp32, fp16, ...) needs no collect_all round.
            self.future = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
        else:
            self.payload = codec.encode(compensated)
            if memory is not None:
                local = codec.decode(self.payload)
            send = self.payload.to_bytes()
            self.gathered = send.new_empty(world * send.numel())
            self.started = state.meter.sent([send], dense)
            self.future = dist.all_gather_single(self.gathered, send, group=state.group, async_op=True).get_future()
        if memory is not None:
            memory.update(name, compensated, local)

    def result(self) -> torch.Tensor:
        """The mean over workers, once the collective has completed."""
        state = self.state
        state.meter.done(self.started)
        if state.codec.capabilities.summable:
            return state.codec.decode(self.payload).view_as(self.like)
        total = torch.zeros_like(self.like)
        for part in self.gathered.view(state.world_size, -1):
            total += state.codec.decode(self.payload.from_bytes(part)).view_as(self.like)
        return total.div_(state.world_size)


class _MeteredComm:
    """Blocking, metered all-reduce for codecs that run their own rounds."""

    def __init__(self, state: CodecHookState):
        self.state = state
        self.world_size = state.world_size

    def all_reduce(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        started = self.state.meter.sent([tensor], dense_numel)
        dist.all_reduce(tensor, group=self.state.group)
        self.state.meter.done(started)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        """Every worker's ``tensor`` (same shape on all), stacked along a new first axis."""
        gathered = tensor.new_empty((self.world_size, *tensor.shape))
        started = self.state.meter.sent([tensor], dense_numel)
        dist.all_gather_single(gathered.view(-1), tensor.reshape(-1), group=self.state.group)
        self.state.meter.done(started)
        return gathered


class LocalComm:
    """A one-worker stand-in for :class:`_MeteredComm`: no network, bytes counted.

    For timing a multi-round codec's own compute (``shoal bench codecs``,
    ``codec: auto``'s probe) and reading what it would send."""

    world_size = 1

    def __init__(self) -> None:
        self.sent = 0

    def all_reduce(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        self.sent += tensor.numel() * tensor.element_size()
        return tensor

    def all_gather(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        self.sent += tensor.numel() * tensor.element_size()
        return tensor.unsqueeze(0)


def _multi_round(state: CodecHookState, name: int, tensor: torch.Tensor, shapes=None) -> torch.Tensor:
    memory = state.memory
    compensated = memory.compensate(name, tensor) if memory is not None else tensor
    result, local = state.codec.exchange(name, compensated, _MeteredComm(state), shapes=shapes)
    if memory is not None:
        memory.update(name, compensated, local)
    return result


def exchange(state: CodecHookState, name: int, tensor: torch.Tensor, shapes=None,
             dense_numel: int | None = None) -> torch.Tensor:
    """Blocking: the mean over workers of ``tensor``, sent through the codec.

    ``shapes``: the tensors ``tensor`` concatenates, for codecs that treat
    each one apart (PowerSGD's matrices). ``dense_numel``: the entries fp32
    all-reduce would have sent, when ``tensor`` is a packed part of them."""
    if state.codec.capabilities.multi_round:
        return _multi_round(state, name, tensor, shapes)
    pending = _Round(state, name, tensor, dense_numel=dense_numel)
    pending.future.wait()
    return pending.result()


def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    params = bucket.parameters()
    _follow_layout(state, bucket.index(), params)
    if state.codec.capabilities.multi_round:
        _adopt_restored(state, bucket.index(), params, None)
        shapes = [p.shape for p in params]
        grad.copy_(_multi_round(state, bucket.index(), grad, shapes))
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(grad)
        return done
    keep = kept_entries(state, bucket)
    _adopt_restored(state, bucket.index(), params, keep)
    if keep is not None and not keep.numel():  # every weight in it pruned, on every rank (one mask)
        grad.zero_()
        nothing: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        nothing.set_result(grad)
        return nothing
    if keep is None:
        pending = _Round(state, bucket.index(), grad)
    else:  # pruned weights: send the kept entries only, the rest of the mean is zero
        pending = _Round(state, bucket.index(), grad[keep], dense_numel=grad.numel())

    def finish(_: torch.futures.Future) -> torch.Tensor:
        result = pending.result()
        if keep is not None:
            grad.zero_().index_put_((keep,), result)
        elif result.data_ptr() != grad.data_ptr():
            grad.copy_(result)
        return grad

    return pending.future.then(finish)


def local_gradient_hook(_: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No communication at all: each worker keeps its own gradient (compute-only baseline)."""
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done
