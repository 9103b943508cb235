"""``shoal serve``: the store, the node, the scheduler and the HTTP API, put together and run.

1. Open the store (``--db``, default ``STATE/jobs.db``); on first start make an admin whose token is
   written to ``STATE/admin.token`` (mode 0600), so only the machine's owner can read it.
2. Discover the node (or take ``--cpus``/``--memory-mb``/``--gpus``) and the cgroup version.
3. Adopt the jobs a previous service left running, start the scheduler thread.
4. Serve the API on ``HOST:PORT`` (loopback unless told otherwise) until SIGINT/SIGTERM; running jobs
   keep running after the service stops, and the next start adopts them.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.platform.agent import Agent
from shoal.platform.node import Cgroups, Node, discover
from shoal.platform.store import JobStore

ADMIN_TOKEN = "admin.token"


@dataclass
class Service:
    store: JobStore
    agent: Agent
    state: Path

    def app(self):  # type: ignore[no-untyped-def]
        from shoal.platform.app import create_app

        return create_app(self.store, self.agent)


def build(state: str | Path, *, db: str | None = None, policy: str = "las", node: Node | None = None,
          share_by: str = "user", cgroups: bool = True, tick_s: float = 0.5, grace_s: float = 60.0,
          grow_after_s: float = 30.0, check: bool = False) -> Service:
    """Everything but the HTTP server; raises ``ValueError`` naming a bad option."""
    from shoal.registry import POLICIES, load_builtins

    load_builtins(POLICIES)
    state = Path(state).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    if share_by not in ("user", "queue"):
        raise ValueError(f"--share-by: {share_by!r} is not user or queue")
    chosen = POLICIES.resolve(policy)
    store = JobStore(db or str(state / "jobs.db"))
    if not store.has_admin():
        token = store.add_user("admin", "admin")
        path = state / ADMIN_TOKEN
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    # The cgroups are named after the state directory, so two services on one host never share them.
    name = hashlib.sha256(str(state).encode()).hexdigest()[:10]
    agent = Agent(store, node or discover(), chosen.target(chosen.options), state,
                  cgroups=Cgroups(name, mode=None if cgroups else "off"),
                  share_by=share_by, tick_s=tick_s, grace_s=grace_s, grow_after_s=grow_after_s, check=check)
    return Service(store, agent, state)


def run(service: Service, host: str = "127.0.0.1", port: int = 8470, *, log_level: str = "warning") -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The scheduler keeps every queued job in memory; Python's cyclic collector would walk all of them
    # each time it collects the oldest generation, stalling every request for that long (200 ms at 10,000
    # queued jobs here). They hold no reference cycles, so the collector may run much less often.
    gc.set_threshold(50_000, 20, 100)
    service.agent.start()
    try:
        uvicorn.run(service.app(), host=host, port=port, log_level=log_level)
    finally:
        service.agent.close()
        service.store.close()
