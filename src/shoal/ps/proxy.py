"""A supervised worker's calls to its supervisor, as methods of one typed proxy.

The worker process (:mod:`shoal.ps.supervisor`) reaches everything outside
itself through one pipe: its parameter-server traffic, answered by the
supervisor's :class:`~shoal.ps.host.PsHost`, and the training loop's few
collectives, answered on the supervisor's process group. Both ends are here:

- :class:`SupervisorProxy`, the worker's end. Each method sends one
  :class:`Call` and waits for its answer, or sends one :class:`Note`, which
  wants none.
- :func:`answers`, the supervisor's end: the one table of which object's
  method answers each :class:`Call`.

The pipe joins a process to the child it started, so messages are pickles;
nothing from the network travels on it.
"""

from __future__ import annotations

import enum
import pickle
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from shoal.engine.group import Group

if TYPE_CHECKING:
    from shoal.ps.host import PsHost
    from shoal.ps.shard import Reply


class Call(enum.Enum):
    """A request the worker waits on; :func:`answers` names who answers it."""

    PUSH = "push"
    PULL = "pull"
    SET_MASKS = "set_masks"
    REQUEST_STOP = "request_stop"
    CLOSE = "close"
    SHARD_STATE = "shard_state"
    LOAD_SHARD_STATE = "load_shard_state"
    LOAD_SHARD_PARAMS = "load_shard_params"
    BARRIER = "barrier"
    BROADCAST_OBJECT = "broadcast_object"
    ALL_GATHER_OBJECT = "all_gather_object"
    ALL_REDUCE = "all_reduce"


class Note(enum.Enum):
    """A message that wants no answer; the supervisor's serving loop acts on it itself."""

    PROGRESS = "progress"  # the run's counters after a step: a restarted worker rejoins from them
    RESULT = "result"  # the worker is done: its summary (rank 0) or None
    ERROR = "error"  # the worker raised: (message, traceback); the rank fails
    DIE = "die"  # fault.target=server: the supervisor kills itself, and its shard with it


def answers(host: PsHost, group: Group) -> dict[Call, Callable[..., Any]]:
    """Who answers each :class:`Call` in the supervising process."""
    return {
        Call.PUSH: host.push,
        Call.PULL: host.pull,
        Call.SET_MASKS: host.set_masks,
        Call.REQUEST_STOP: host.request_stop,
        Call.CLOSE: host.close,
        Call.SHARD_STATE: host.shard_state,
        Call.LOAD_SHARD_STATE: host.load_shard_state,
        Call.LOAD_SHARD_PARAMS: host.load_shard_params,
        Call.BARRIER: group.barrier,
        Call.BROADCAST_OBJECT: group.broadcast_object,
        Call.ALL_GATHER_OBJECT: group.all_gather_object,
        Call.ALL_REDUCE: group.all_reduce,
    }


class LinkClosed(RuntimeError):
    """The supervisor is gone (it died, or is killing this process)."""


class SupervisorProxy(Group):
    """The worker's end of the pipe: the parameter-server calls, and the loop's
    collectives (as a :class:`~shoal.engine.group.Group`) done by the supervisor."""

    def __init__(self, conn: Any):
        self.conn = conn

    def push(self, pushes: list[tuple[list[torch.Tensor], dict[str, Any]]], worker: int, versions: list[int],
             clock: int, lr: float, mask_versions: list[int]) -> list[Reply]:
        """Every shard's encoded slice; back come the shards' parameters."""
        return self._call(Call.PUSH, pushes, worker, versions, clock, lr, mask_versions)

    def pull(self) -> list[Reply]:
        return self._call(Call.PULL)

    def set_masks(self, masks: list[torch.Tensor]) -> None:
        self._call(Call.SET_MASKS, masks)

    def request_stop(self) -> None:
        self._call(Call.REQUEST_STOP)

    def close(self, worker: int) -> tuple[list[Reply], dict[str, float]]:
        return self._call(Call.CLOSE, worker)

    def shard_state(self) -> dict[str, Any] | None:
        return self._call(Call.SHARD_STATE)

    def load_shard_state(self, state: dict[str, Any] | None, versions: list[int]) -> None:
        self._call(Call.LOAD_SHARD_STATE, state, versions)

    def load_shard_params(self, flat: torch.Tensor) -> None:
        self._call(Call.LOAD_SHARD_PARAMS, flat)

    def barrier(self) -> None:
        self._call(Call.BARRIER)

    def broadcast_object(self, obj: Any) -> Any:
        return self._call(Call.BROADCAST_OBJECT, obj)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._call(Call.ALL_GATHER_OBJECT, obj)

    def all_reduce(self, values: list[float], op: Literal["sum", "max"] = "sum") -> list[float]:
        return self._call(Call.ALL_REDUCE, values, op)

    def progress(self, counters: dict[str, Any]) -> None:
        self._send((Note.PROGRESS, (counters,)))

    def result(self, summary: dict[str, Any] | None) -> None:
        self._send((Note.RESULT, (summary,)))

    def error(self, message: str, trace: str) -> None:
        self._send((Note.ERROR, ((message, trace),)))

    def die(self) -> None:
        self._send((Note.DIE, ()))

    def _call(self, call: Call, *args: Any) -> Any:
        self._send((call, args))
        try:
            status, value = pickle.loads(self.conn.recv_bytes())
        except (OSError, EOFError) as err:
            raise LinkClosed("the supervising process is gone") from err
        if status != "ok":
            raise RuntimeError(value)
        return value

    def _send(self, message: tuple[Call | Note, tuple[Any, ...]]) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError) as err:
            raise LinkClosed("the supervising process is gone") from err
