"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler taking the machine back).

Both signals reach every worker: a terminal sends Ctrl-C to the whole
foreground process group, and the elastic agent passes the signal it got on
to its workers. A worker does not stop where the signal finds it. It notes
the signal and trains on to a step boundary that all workers agree on. Then
it writes the run's checkpoint (the same one a finished run leaves, so
``--resume`` continues from it) and ``stopped.json``, and exits. Repeated
signals while it stops (Ctrl-C pressed twice, or the agent passing on the
terminal's) change nothing. If the workers are still going after the
agent's shutdown timeout (30 s), the agent kills them, and the last
checkpoint on disk is still whole, since it is written atomically.

Agreement: the first worker to see its signal proposes "stop after step
s + margin" in the job's store, and every worker reads the one proposal that
won. The margin covers how far apart workers can be when the signal arrives.
That is a step for strategies that keep in step every step, and a whole
averaging period under local SGD (``Strategy.stop_margin``). Nothing is
exchanged before a signal arrives. Strategies whose workers do not keep in
step (the parameter servers) stop the way they stop at a target: the
servers tell every worker.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

STOPPED = "stopped.json"
POLL_EVERY = 4  # steps between an unsignalled worker's looks for a stop proposal (one store round trip)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it


class GracefulStop:
    """A worker's record of a stop request, and the step it stops after.

    ``store``: the job's store (any object with torch.distributed.Store's
    ``compare_set``), or None where the worker decides alone."""

    def __init__(self, store: Any | None = None, key: str = "shoal/stop_after"):
        self.store = store
        self.key = key
        self.signal: signal.Signals | None = None
        self.after: int | None = None  # the agreed last step
        # Called with the first signal: a parameter-server supervisor passes it on to its worker process.
        self.relay: Callable[[signal.Signals], None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)
            if self.relay is not None:
                self.relay(self.signal)

    def relay_to(self, relay: Callable[[signal.Signals], None]) -> None:
        """Pass the first signal on through ``relay``: from now on, and at once if it came already."""
        self.relay = relay
        if self.signal is not None:
            relay(self.signal)

    @property
    def exit_code(self) -> int:
        """What a stopped worker exits with: the shell's 128 + signal."""
        return EXIT_CODES.get(self.signal, 1) if self.signal is not None else 0

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a signal on its way (relayed, or passed on by the agent)."""
        deadline = time.monotonic() + seconds
        while self.signal is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.signal is not None

    def stop_after(self, step: int, margin: int) -> int | None:
        """At a step boundary (``step`` steps done): the step to stop after, or None to go on.

        A worker that got no signal of its own (one node's agent signalled, a single worker
        killed, or its signal late on a loaded machine) still looks for another's proposal in
        the store every ``POLL_EVERY`` steps; the proposal leaves room for that look."""
        if self.after is not None:
            return self.after
        if self.signal is None:
            if self.store is None or step % POLL_EVERY or not self.store.check([self.key]):
                return None
            self.after = int(self.store.get(self.key))
        elif self.store is None:
            self.after = step
        else:  # the first proposal in the store wins; everyone reads it
            proposal = str(step + margin + POLL_EVERY)
            self.after = int(self.store.compare_set(self.key, "", proposal))
        return self.after


def write_stopped(out: Path, signal_name: str, step: int) -> None:
    """Rank 0, after the stop's checkpoint: what stopped the run, and where."""
    from shoal.metrics.summary import write_json_atomic

    write_json_atomic(out / STOPPED, {"signal": signal_name, "step": step, "checkpoint": str(out / "checkpoint.pt")})


def read_stopped(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STOPPED).read_text())
    except (OSError, ValueError):
        return None
