"""DDP communication hook that sends each gradient bucket through a codec.

Follows the shape of PyTorch's ``ddp_comm_hooks``: a state object plus a plain
function ``hook(state, bucket) -> Future[Tensor]``, so DDP keeps its bucketing
and backward overlap. Summable payloads are all-reduced tensor by tensor, in
the same order on every rank (collectives issued from one hook call, never from
callbacks, so ranks cannot reorder them).
"""

# No "from __future__ import annotations": DDP checks the hook's real annotations.
import torch
import torch.distributed as dist

from shoal.comm.codecs.base import Codec, Payload
from shoal.comm.wire import WireMeter


class CodecHookState:
    __slots__ = ("codec", "meter", "group", "world_size")

    def __init__(self, codec: Codec, meter: WireMeter, group: "dist.ProcessGroup | None" = None):
        self.codec = codec
        self.meter = meter
        self.group = group
        self.world_size = dist.get_world_size(group)


def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    if not state.codec.summable:
        raise NotImplementedError(f"{type(state.codec).__name__} payloads need all-gather, not supported yet")
    # Averaging before the sum keeps fp32 exactly as DDP's own allreduce hook does.
    grad.div_(state.world_size)
    payload = state.codec.encode(grad)
    started = state.meter.sent(payload.tensors, grad.numel())
    futures = [
        dist.all_reduce(t, group=state.group, async_op=True).get_future() for t in payload.tensors
    ]

    def finish(_: torch.futures.Future) -> torch.Tensor:
        state.meter.done(started)
        decoded = state.codec.decode(Payload(payload.tensors, payload.ctx))
        if decoded.data_ptr() != grad.data_ptr():
            grad.copy_(decoded)
        return grad

    # One payload tensor (fp32, fp16, ...) needs no collect_all round.
    joined = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    return joined.then(finish)
