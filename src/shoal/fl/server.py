"""``shoal fl server``: the federation's server over gRPC with mutual TLS.

Protocol (every message is :mod:`shoal.fl.wire`; every request carries the
client's token, checked against the hashed tokens in the state store, and
the partition it speaks for, which that token must hold; with TLS the client
certificate's name must be the token's):

- ``Join``  ``{token, partition}`` -> ``{round, clients, incarnation}``: the
  client says which partition of the data it holds;
- ``Task``  ``{token, partition, after, incarnation}`` -> ``{done}``,
  ``{wait}`` or ``{round, config}`` + the global ``weights`` (one message per
  round, packed once; its size is the round's downlink per client that
  fetched it): a long poll (up to :data:`POLL_S`) for a round this client is
  selected for, newer than ``after``. ``incarnation`` names the server
  process that answered last; one from an earlier process voids ``after``,
  so a round a restarted server opens again is offered again. One poll at a
  time per (token, partition): a second is refused with ABORTED. A client's
  local epochs come from the shared config
  (:class:`~shoal.fl.federation.Fleet`), as its dropouts and slowness do;
- ``Submit`` ``{token, partition, round, num_examples, loss}`` + the codec's
  payload tensors -> ``{accepted, reason}``. The first token to answer a
  (round, partition) owns it: a retry gets the verdict its first try got,
  another token's submit is refused.
- ``Secure`` ``{token, partition, round, stage}`` + the stage's tensors ->
  ``{}`` + the next stage's input, or ``{excluded}``: under ``fl.secure``
  a round's Task carries the SecAgg+ setup (:mod:`shoal.fl.secure.secagg`),
  and a client sends its ``keys``, ``shares``, ``masked`` (with
  ``num_examples`` and ``loss``) and ``unmask`` messages through this call,
  each answered once its stage has closed (every expected client sent it,
  or ``stage_timeout_s`` passed; the masked inputs wait until
  ``fl.deadline_s``). A malformed, misplaced or replayed message is refused
  and logged; the client is then out of the round.

Join and Task requests over :data:`SMALL_REQUEST_BYTES` are refused before
the token is looked at, and a Submit's tensors are read only once its token
and partition passed. A round samples from the clients seen in the last :data:`ALIVE_S` seconds
(once at least ``fl.min_clients`` are), waits for the selected ones until
``fl.deadline_s``, aggregates what arrived in time and passed validation
(:meth:`Federation.decode`), evaluates, and stores the round's metrics, the
global weights and the strategy's state in one transaction
(:class:`~shoal.fl.store.ServerStore`). A server started on the same
database resumes after the last stored round; clients ride out the restart
by retrying (:class:`~shoal.fl.transport.Connection`).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from rich.console import Console

from shoal.fl import wire
from shoal.fl.certs import TlsFiles
from shoal.fl.config import FlRunConfig
from shoal.fl.federation import Federation, RoundTally, UpdateRejected
from shoal.fl.secure import grpc_mechanism
from shoal.fl.store import ServerStore
from shoal.fl.strategies.base import ClientResult
from shoal.fl.transport import peer_identity, serve
from shoal.metrics.summary import write_json_atomic

log = logging.getLogger("shoal.fl")
POLL_S = 2.0  # longest a Task call waits for work
ALIVE_S = 6.0  # a client not heard from for this long is not sampled (clients poll every POLL_S)
SMALL_REQUEST_BYTES = 4 << 10  # a Join or Task request carries a token and a few numbers
FAULT = "fault.json"  # written by a server killed by server.kill_before_commit


class ServerGaveUp(RuntimeError):
    """Too few clients connected within ``server.wait_for_clients_s``."""


class _Round:
    def __init__(self, number: int, selected: list[int], weights: torch.Tensor, config: dict[str, Any],
                 incarnation: str):
        self.number = number
        self.selected = set(selected)
        self.tally = RoundTally(selected=selected)
        # The same message for every client.
        self.task = wire.pack({"round": number, "config": config, "incarnation": incarnation}, {"weights": weights})
        self.answered: set[int] = set()
        self.owners: dict[int, str] = {}  # partition -> the token whose submit answered it
        self.verdicts: dict[int, str] = {}  # partition -> why its update was rejected ("" accepted)
        self.closed = False
        self.secure: Any = None  # fl.secure: this round's SecAggServer


class FlServer:
    """``he_key``: under a mechanism that needs keys (``fl.secure: ckks``), the public key file from
    ``shoal fl keys``; the server never holds the secret one."""

    def __init__(self, cfg: FlRunConfig, out: str | Path, *, console: Console | None = None,
                 he_key: str | Path | None = None):
        secure = grpc_mechanism(cfg, he_key, server=True)  # before server.db is made
        self.cfg = cfg
        self.out = Path(out)
        self.console = console or Console()
        self.store = ServerStore(cfg.server.db)
        start = self.store.last_round()
        self.fed = Federation(cfg, out, start_round=start, console=self.console, mode="server")
        if secure is not None:
            self.fed.secure = secure
        self.cfg = cfg = self.fed.cfg  # fl.privacy's noise calibrated (the same on every restart)
        if start:
            state = self.store.load_state()
            _, tensors = wire.unpack(state["weights"])
            _, strategy_state = wire.unpack(state["strategy"])
            self.fed.restore(tensors["weights"], [r["metrics"] for r in self.store.round_metrics()])
            self.fed.strategy.load_state_dict(strategy_state)
            self.console.print(f"resuming after round {start} (state from {cfg.server.db})", highlight=False)
        self.resumed_from = start or None
        self.cond = threading.Condition()
        self.seen: dict[int, float] = {}  # partition -> last time heard from
        self.current: _Round | None = None
        self.finished = False
        self.told_done: set[int] = set()  # partitions told that training is over
        self.polling: set[tuple[str, int]] = set()  # (token name, partition) with a Task waiting
        self.incarnation = secrets.token_hex(8)  # this process, as the clients see it
        self.port = 0

    # --- handlers (gRPC threads) --------------------------------------------------
    def _auth(self, request: bytes, context: grpc.ServicerContext, limit: int) -> tuple[str, int, dict[str, Any]]:
        """The token's name, the partition it speaks for and the request's meta; aborts the call otherwise."""
        try:
            meta = wire.peek_meta(request, max_bytes=limit)
        except wire.WireError as err:
            log.warning("rejected a malformed message from %s: %s", context.peer(), err)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}")
        grant = self.store.check_token(meta.get("token", ""))
        cert = peer_identity(context)
        if grant is None:
            log.warning("refused %s (certificate %s): invalid or revoked token", context.peer(), cert)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
        part = meta.get("partition")
        if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < self.cfg.fl.clients:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"partition must be an integer in [0, {self.cfg.fl.clients})")
        if part not in grant.partitions:
            held = ", ".join(map(str, sorted(grant.partitions))) or "none"
            log.warning("refused %s (token %s, certificate %s): partition %d is not the token's (it holds %s)",
                        context.peer(), grant.name, cert, part, held)
            hint = "" if grant.partitions else (
                f"; it was issued before tokens held partitions: `shoal fl token add {grant.name} --partition N "
                "--replace` issues one that does")
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"this token does not hold partition {part} (it holds {held}){hint}")
        if cert is not None and cert != grant.name:
            log.warning("refused %s: certificate %s presented with token %s", context.peer(), cert, grant.name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the client certificate is for {cert!r}, the token for another client")
        with self.cond:
            self.seen[part] = time.monotonic()  # the round loop polls this; no need to wake anyone
        return grant.name, part, meta

    def join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        name, part, _ = self._auth(request, context, SMALL_REQUEST_BYTES)
        self.store.client_seen(name)
        log.info("client %s joined with partition %d (certificate %s)", name, part, peer_identity(context))
        return wire.pack({"round": self.fed.round, "clients": self.cfg.fl.clients,
                          "incarnation": self.incarnation}, {})

    def task(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        name, part, meta = self._auth(request, context, SMALL_REQUEST_BYTES)
        after = meta.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "after must be a round number")
        incarnation = meta.get("incarnation")
        if isinstance(incarnation, str) and incarnation != self.incarnation:
            after = 0  # rounds seen by an earlier server process: this one may have opened them again
        poller = (name, part)
        with self.cond:
            if poller in self.polling:
                log.warning("refused %s: token %s already waits for a task for partition %d", context.peer(),
                            name, part)
                context.abort(grpc.StatusCode.ABORTED, f"a Task for partition {part} is already waiting")
            self.polling.add(poller)
        try:
            return self._next_task(part, after)
        finally:
            with self.cond:
                self.polling.discard(poller)

    def _next_task(self, part: int, after: int) -> bytes:
        deadline = time.monotonic() + POLL_S
        with self.cond:
            while True:
                if self.finished:
                    self.told_done.add(part)
                    return wire.pack({"done": True, "round": self.fed.round, "incarnation": self.incarnation}, {})
                r = self.current
                if r is not None and not r.closed and part in r.selected and r.number > after \
                        and part not in r.answered:
                    r.tally.downlink_bytes += len(r.task)
                    return r.task
                left = deadline - time.monotonic()
                if left <= 0:
                    return wire.pack({"wait": True, "incarnation": self.incarnation}, {})
                self.cond.wait(left)

    def _read(self, request: bytes, context: grpc.ServicerContext,
              what: str) -> tuple[str, int, dict[str, Any], dict[str, torch.Tensor]]:
        """A message that carries tensors: its token's name, partition, meta and tensors (the tensors read
        only once the token and partition passed); aborts the call otherwise."""
        limit = int(self.cfg.server.max_update_bytes)
        name, part, meta = self._auth(request, context, limit)
        try:
            _, tensors = wire.unpack(request, max_bytes=limit)
        except wire.WireError as err:
            log.warning("rejected a malformed %s from %s (token %s): %s", what, context.peer(), name, err)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}")
        return name, part, meta, tensors

    def submit(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        name, part, meta, tensors = self._read(request, context, "update")
        rnd, count = meta.get("round"), meta.get("num_examples")
        with self.cond:
            r = self.current
            reason = None
            if r is None or rnd != r.number or part not in r.selected:
                reason = f"round {rnd} is not open for partition {part} (open: {r.number if r else None})"
            elif r.closed:
                r.tally.late.append(part)
                reason = f"round {rnd} closed at its deadline"
            elif part in r.answered:
                if r.owners[part] != name:
                    log.warning("update from %s (partition %d) for round %s refused: another token answered it",
                                name, part, rnd)
                    return wire.pack({"accepted": False, "reason": f"round {rnd}'s update for partition {part} "
                                      "came from another token"}, {})
                verdict = r.verdicts.get(part, "")  # a retried call: the verdict its first try got
                return wire.pack({"accepted": not verdict, "reason": verdict or "already received"}, {})
            if reason is None:
                r.owners[part] = name
                r.answered.add(part)
                try:
                    if not isinstance(count, int) or isinstance(count, bool):
                        raise UpdateRejected("num_examples must be an integer")
                    loss = meta.get("loss", 0.0)
                    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
                        raise UpdateRejected(f"loss must be a finite number, got {loss!r}")
                    keys = [f"p{k}" for k in range(len(tensors))]
                    if sorted(tensors) != sorted(keys):
                        raise UpdateRejected(f"tensors must be named p0..p{len(tensors) - 1}")
                    delta = self.fed.decode(part, [tensors[k] for k in keys], count)
                except UpdateRejected as err:
                    r.tally.rejected.append(part)
                    reason = r.verdicts[part] = f"rejected: {err}"
                else:
                    r.tally.results.append(ClientResult(str(part), delta, count, float(loss)))
                    r.tally.uplink_bytes += wire.payload_bytes(tensors)
                    self.cond.notify_all()
            if reason is not None:
                log.warning("update from %s (partition %d) for round %s: %s", name, part, rnd, reason)
        if reason is not None:  # an accepted update is counted when its round is aggregated
            self.store.client_result(name, False)
        return wire.pack({"accepted": reason is None, "reason": reason or ""}, {})

    def secure(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """One client's message of one secure-aggregation stage; answered once the round can (SecAgg+:
        when the stage has closed)."""
        from shoal.fl.secure.secagg import ProtocolError

        name, part, meta, tensors = self._read(request, context, "secure-aggregation message")
        rnd, stage = meta.get("round"), meta.get("stage")
        with self.cond:
            r = self.current
            try:
                if r is None or r.secure is None or rnd != r.number or part not in r.selected:
                    raise ProtocolError(f"round {rnd} is not a secure round open for partition {part}")
                sa = r.secure
                if stage == sa.result_stage:
                    self._take_secure_result(r, part, meta)
                sa.receive(stage, part, tensors)
            except (ProtocolError, UpdateRejected) as err:
                log.warning("secure-aggregation message from %s (partition %d, round %s, stage %r) refused: %s",
                            name, part, rnd, stage, err)
                if r is not None and r.secure is not None and rnd == r.number and part in r.selected:
                    r.tally.rejected.append(part)
                return wire.pack({"excluded": f"refused: {err}"}, {})
            r.owners.setdefault(part, name)
            r.tally.uplink_bytes += wire.payload_bytes(tensors)
            if stage == sa.result_stage:
                r.tally.secure_masked_bytes += wire.payload_bytes(tensors)
            self.cond.notify_all()
            if stage == sa.stages[-1]:
                return wire.pack({"done": True}, {})
            while not sa.ready(stage, part) and self.current is r and r.tally.secure_error is None:
                self.cond.wait(0.5)  # the round loop closes the stage
            if r.tally.secure_error is not None:
                return wire.pack({"excluded": r.tally.secure_error}, {})
            reply_meta, reply = sa.reply(stage, part)
            r.tally.downlink_bytes += wire.payload_bytes(reply)
            return wire.pack(reply_meta, reply)

    def _take_secure_result(self, r: _Round, part: int, meta: dict[str, Any]) -> None:
        """The loss and sample count that travel beside a masked input, checked as Submit checks them."""
        count, loss = meta.get("num_examples"), meta.get("loss", 0.0)
        held = len(self.fed.parts[part])
        if count != held or isinstance(count, bool):
            raise UpdateRejected(f"num_examples {count!r}: partition {part} holds {held} training samples")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
            raise UpdateRejected(f"loss must be a finite number, got {loss!r}")
        r.tally.losses[part] = (float(loss), held)

    def _secure_stages(self, r: _Round, opened: float) -> None:
        """Run the round's secure aggregation: close the open stage when all it waits for arrived or its time
        is up (the message with the update: fl.deadline_s after the round opened), until none is open; the
        sum goes into the tally."""
        from shoal.fl.secure.secagg import RoundAborted

        timeout = self.cfg.fl.secure.options.stage_timeout_s
        sa = r.secure
        try:
            while (stage := sa.open_stage) is not None:
                end = opened + self.cfg.fl.deadline_s if stage == sa.result_stage else time.monotonic() + timeout
                while not sa.expected() <= sa.received() and time.monotonic() < end:
                    self.cond.wait(min(0.2, max(end - time.monotonic(), 0.0)))
                try:
                    sa.close()
                finally:
                    self.cond.notify_all()
            r.tally.secure = sa.result()
        except RoundAborted as err:
            r.tally.secure_error = str(err)
        for sender, about, kind in (r.tally.secure.forged if r.tally.secure is not None else []):
            log.warning("round %d: partition %d sent a wrong share of partition %d's %s", r.number, sender, about,
                        "self mask" if kind == "b" else "key")

    # --- the round loop ----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        tls = None if cfg.server.insecure else TlsFiles.server(Path(cfg.server.certs))
        handlers = {"Join": self.join, "Task": self.task, "Submit": self.submit, "Secure": self.secure}
        limit = int(cfg.server.max_update_bytes) + (1 << 20)
        # One waiting Task per partition at most, and threads to spare for Join and Submit; calls
        # beyond the threads are refused (the client retries) rather than queued behind long polls.
        workers = min(256, cfg.fl.clients + 8)
        server, self.port = serve(cfg.server.address, handlers, tls, max_message_bytes=limit, workers=workers,
                                  max_concurrent_calls=workers)
        host = cfg.server.address.rpartition(":")[0]
        write_json_atomic(self.out / "server.json", {"address": f"{host}:{self.port}", "pid": os.getpid()})
        self.console.print(f"listening on {host}:{self.port} ({'no TLS' if tls is None else 'mutual TLS'}), "
                           f"round {self.fed.round + 1} of {cfg.fl.rounds}", highlight=False)
        try:
            while not self.fed.done():
                self._round(self.fed.round + 1)
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()
                # Every client seen lately hears that training is over before the server goes
                # (one still training asks at its next call); one that died is waited for no
                # longer than it counts as alive.
                end = time.monotonic() + ALIVE_S
                while set(self._alive()) - self.told_done and time.monotonic() < end:
                    self.cond.wait(0.2)
            server.stop(grace=1.0)
        summary = self.fed.close(resumed_from_round=self.resumed_from, clients_seen=len(self.store.clients()))
        self.store.close()
        return summary

    def _die_before_commit(self, rnd: int) -> None:
        """Fault injection (``server.kill_before_commit``, tests only): SIGKILL this server between
        aggregating round ``rnd`` (its noise drawn, its epsilon spent in memory, its metrics line
        written) and storing it. Once per output directory, as ``shoal train``'s ``fault:`` is
        first-attempt only: the marker it leaves lets the restarted server run the round through."""
        marker = self.out / FAULT
        if marker.exists():
            return
        write_json_atomic(marker, {"target": "fl-server", "kill_before_commit": rnd, "time": time.time()})
        log.warning("server.kill_before_commit=%d: killing the server before round %d is stored", rnd, rnd)
        os.kill(os.getpid(), signal.SIGKILL)

    def _alive(self) -> list[int]:
        now = time.monotonic()
        return [p for p, t in self.seen.items() if now - t < ALIVE_S]

    def _round(self, rnd: int) -> None:
        cfg = self.cfg.fl
        wait_s = self.cfg.server.wait_for_clients_s
        give_up = time.monotonic() + wait_s
        told = -1  # clients connected when the server last said it waits
        with self.cond:
            while len(self._alive()) < cfg.min_clients:
                now = time.monotonic()
                if now > give_up:
                    raise ServerGaveUp(f"round {rnd}: fewer than fl.min_clients={cfg.min_clients} clients connected "
                                       f"within server.wait_for_clients_s={wait_s:g}")
                if len(self._alive()) != told:  # say so at once, and again whenever the count changes
                    told = len(self._alive())
                    self.console.print(f"round {rnd}: waiting for clients, {told} of fl.min_clients="
                                       f"{cfg.min_clients} connected; giving up in {give_up - now:.0f} s "
                                       "(server.wait_for_clients_s)", highlight=False)
                self.cond.wait(0.5)
            selected = self.fed.sample(rnd, self._alive())
            config = self.fed.strategy.client_config(rnd)
            setup = None
            if self.fed.secure is not None:
                setup = self.fed.secure_setup(rnd, selected)
                config = {**config, "secure": setup.to_meta()}
            r = _Round(rnd, selected, self.fed.weights, config, self.incarnation)
            if setup is not None:
                r.secure = self.fed.secure.server(setup)
            self.current = r
            self.cond.notify_all()
            opened = time.monotonic()
            if r.secure is not None:
                self._secure_stages(r, opened)
                r.answered = set(r.tally.losses)
            else:
                deadline = opened + cfg.deadline_s
                while r.answered != r.selected and time.monotonic() < deadline:
                    self.cond.wait(min(0.5, max(deadline - time.monotonic(), 0.0)))
            r.closed = True
            r.tally.dropped = sorted(r.selected - r.answered)
        arrived = [int(result.client) for result in r.tally.results]  # before the norm bound drops any
        if r.tally.secure is not None:
            arrived = list(r.tally.secure.clients)
        r.tally.secure_overhead_bytes = r.tally.uplink_bytes - r.tally.secure_masked_bytes
        record = self.fed.finish_round(rnd, r.tally)
        blobs = {"weights": wire.pack({}, {"weights": self.fed.weights}),
                 "strategy": wire.pack({}, self.fed.strategy.state_dict())}
        if self.cfg.server.kill_before_commit == rnd:
            self._die_before_commit(rnd)
        # The round's metrics, the new weights and the strategy's state (DP-FedAvg's privacy ledger
        # with it) in one transaction: a server killed before it resumes after the previous round,
        # the budget spent as that round left it, and runs this one again.
        self.store.save_round(rnd, record, blobs)
        bounced = set(record.get("norm_rejected_clients", []))
        for part in arrived:
            self.store.client_result(r.owners[part], part not in bounced)
        if "test_accuracy" in record:
            self.fed.log_round(record)
        for part in r.tally.dropped:
            log.info("round %d: partition %d did not answer by the deadline", rnd, part)
