"""The process group as the codec exchange uses it: every collective metered.

What a worker hands over is counted by :class:`shoal.comm.wire.WireMeter` (its
bytes when handed over, its time until it has landed) here and nowhere else:
the DDP hook's single round starts its one collective with ``start_all_reduce``
/ ``start_all_gather`` and calls ``done`` when it lands; a multi-round codec's
``exchange(name, tensor, comm, shapes)`` calls the blocking ``all_reduce`` /
``all_gather``. :class:`LocalComm` stands in for one worker without a network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from shoal.comm.wire import WireMeter


class MeteredComm:
    """Collectives on ``group``, each one's bytes and time on ``meter``."""

    def __init__(self, meter: WireMeter, group: dist.ProcessGroup | None, world_size: int):
        self.meter, self.group, self.world_size = meter, group, world_size

    def all_reduce(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        started, _ = self._hand_over([tensor], dense_numel, lambda: dist.all_reduce(tensor, group=self.group))
        self.done(started)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dense_numel: int = 0) -> torch.Tensor:
        """Every worker's ``tensor`` (same shape on all), stacked along a new first axis."""
        gathered = tensor.new_empty((self.world_size, *tensor.shape))
        started, _ = self._hand_over([tensor], dense_numel, lambda: dist.all_gather_single(
            gathered.view(-1), tensor.reshape(-1), group=self.group))
        self.done(started)
        return gathered

    def start_all_reduce(self, tensors: list[torch.Tensor], dense_numel: int) -> tuple[float, torch.futures.Future]:
        """Each of ``tensors`` summed over workers in place, as one metered collective:
        its start time and a future that completes when all have landed."""
        def issue() -> torch.futures.Future:
            futures = [dist.all_reduce(t, group=self.group, async_op=True).get_future() for t in tensors]
            # One payload tensor (fp32, fp16, ...) needs no collect_all round.
            return futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
        return self._hand_over(tensors, dense_numel, issue)

    def start_all_gather(self, gathered: torch.Tensor, send: torch.Tensor,
                         dense_numel: int) -> tuple[float, torch.futures.Future]:
        """Every worker's flat ``send`` into ``gathered``, one after another: its start time and future."""
        return self._hand_over([send], dense_numel, lambda: dist.all_gather_single(
            gathered, send, group=self.group, async_op=True).get_future())

    def done(self, started: float) -> None:
        """The collective started at ``started`` has landed."""
        self.meter.done(started)

    def _hand_over(self, sent: list[torch.Tensor], dense_numel: int,
                   collective: Callable[[], Any]) -> tuple[float, Any]:
        # The blocking calls stay blocking calls (not a started one waited for):
        # the backend is told, and a failure raises as it always has.
        return self.meter.sent(sent, dense_numel), collective()


class LocalComm:
    """A one-worker stand-in for :class:`MeteredComm`: no network, bytes counted.

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
