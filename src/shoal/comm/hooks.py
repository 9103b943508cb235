"""DDP communication hook that sends each gradient bucket through a codec.

Follows the shape of PyTorch's ``ddp_comm_hooks``: a state object plus a plain
function ``hook(state, bucket) -> Future[Tensor]``, so DDP keeps its bucketing
and backward overlap. Per bucket:

1. compensate with the error-feedback residual (``memory=ef``)
2. encode; remember what the local payload decodes to, for the residual
3. summable payloads: all-reduce each tensor, decode the sum, divide by N;
   others: all-gather the payload's bytes in one collective, decode each
   worker's payload, average
4. codecs with several dependent rounds (PowerSGD) run them inside the hook
   call, blocking, so every rank issues its collectives in the same order
"""

# No "from __future__ import annotations": DDP checks the hook's real annotations.
import torch
import torch.distributed as dist

from shoal.comm.codecs.base import Codec
from shoal.comm.memory import ErrorFeedback
from shoal.comm.wire import WireMeter


class CodecHookState:
    __slots__ = ("codec", "meter", "group", "world_size", "memory")

    def __init__(self, codec: Codec, meter: WireMeter, group: "dist.ProcessGroup | None" = None):
        self.codec = codec
        self.meter = meter
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.memory = ErrorFeedback() if codec.options.memory == "ef" else None


def _done(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut


def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    name = bucket.index()
    world = state.world_size
    compensated = state.memory.compensate(name, grad) if state.memory is not None else grad

    if hasattr(state.codec, "exchange"):
        result, local = state.codec.exchange(name, compensated, _MeteredComm(state))
        if state.memory is not None:
            state.memory.update(name, compensated, local)
        grad.copy_(result)
        return _done(grad)

    if state.codec.summable:
        # Scale before the sum, as DDP's own hook does: no overflow in low precision.
        payload = state.codec.encode(compensated / world)
        if state.memory is not None:
            state.memory.update(name, compensated, state.codec.decode(payload) * world)
        started = state.meter.sent(payload.tensors, grad.numel())
        futures = [dist.all_reduce(t, group=state.group, async_op=True).get_future() for t in payload.tensors]

        def finish_sum(_: torch.futures.Future) -> torch.Tensor:
            state.meter.done(started)
            decoded = state.codec.decode(payload)
            if decoded.data_ptr() != grad.data_ptr():
                grad.copy_(decoded)
            return grad

        # One payload tensor (fp32, fp16, ...) needs no collect_all round.
        joined = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
        return joined.then(finish_sum)

    payload = state.codec.encode(compensated)
    if state.memory is not None:
        state.memory.update(name, compensated, state.codec.decode(payload))
    send = payload.to_bytes()
    gathered = send.new_empty(world * send.numel())
    started = state.meter.sent([send], grad.numel())
    fut = dist.all_gather_single(gathered, send, group=state.group, async_op=True).get_future()

    def finish_gather(_: torch.futures.Future) -> torch.Tensor:
        state.meter.done(started)
        total = torch.zeros_like(grad)
        for part in gathered.view(world, -1):
            total += state.codec.decode(payload.from_bytes(part)).view_as(grad)
        grad.copy_(total.div_(world))
        return grad

    return fut.then(finish_gather)


class _MeteredComm:
    """Blocking, metered collectives for codecs that run their own rounds."""

    def __init__(self, state: CodecHookState):
        self.state = state
        self.world_size = state.world_size

    def all_reduce(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        started = self.state.meter.sent([tensor], dense_numel)
        dist.all_reduce(tensor, group=self.state.group)
        self.state.meter.done(started)
        return tensor


