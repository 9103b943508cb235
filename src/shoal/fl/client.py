"""``shoal fl client``: one client of a federation, over gRPC with mutual TLS.

The client builds the dataset and model from the same config as the server,
keeps only its own partition of the training data (the partitions depend on
the config and seed alone, so server and clients agree without sending any
data), joins with its token, and then repeats: long-poll for a round it is
selected for, train locally from the round's global weights
(:class:`~shoal.fl.local.LocalTrainer`, FedProx's term and the uplink codec
with this client's own error feedback included), send the update. Fleet
conditions of the config apply to it as in a simulation: it skips the rounds
``fleet.dropout`` drops it from, and a slow client (``fleet.slow_fraction``)
sleeps to take ``slow_factor`` times its compute time. A server that goes
away is waited for (retries with backoff, up to ``retry_for_s``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from shoal.comm.codecs.base import build_codec
from shoal.comm.memory import ErrorFeedback
from shoal.data import build_dataset
from shoal.data.shard import fetch
from shoal.fl import wire
from shoal.fl.certs import TlsFiles
from shoal.fl.config import FlRunConfig
from shoal.fl.federation import Fleet, client_partitions
from shoal.fl.local import LocalTrainer, client_seed, local_privacy
from shoal.fl.secure import grpc_mechanism
from shoal.fl.transport import Connection
from shoal.models.build import build_model
from shoal.tasks.base import build_task

log = logging.getLogger("shoal.fl")


def _secure_round(conn: Connection, cfg: FlRunConfig, me: dict[str, Any], meta: dict[str, Any],
                  weights: torch.Tensor, trainer: LocalTrainer, fleet: Fleet, x: torch.Tensor, y: torch.Tensor,
                  memory: ErrorFeedback | None, partition: int, console: Console, mechanism: Any) -> str:
    """Take part in one round under ``fl.secure``: the mechanism's stages in order (SecAgg+: keys and
    shares while training, then the masked input, then the shares the server needs; CKKS: train and
    upload the encrypted update, then decrypt the sum if asked). Returns the tally key: rounds,
    skipped or rejected."""
    from shoal.fl.secure.secagg import ProtocolError

    rnd = meta["round"]
    try:
        setup = mechanism.setup_from_meta(meta["config"]["secure"], weights.numel())
        client = mechanism.client(setup, partition, weights)
    except ProtocolError as err:
        console.print(f"round {rnd}: refusing the round: {err}", highlight=False)
        return "rejected"
    if fleet.drops(rnd, partition) and cfg.fl.fleet.drop_stage == "train":
        log.info("round %d: dropping out (fleet.dropout)", rnd)
        return "skipped"
    stop = mechanism.drop_point(cfg.fl.fleet.drop_stage) if fleet.drops(rnd, partition) else None
    # A call waits for its stage to close; under ckks an uploaded client waits while others are
    # asked, one stage_timeout_s each, to decrypt the sum.
    timeout = cfg.fl.deadline_s + cfg.fl.secure.options.stage_timeout_s * (len(setup.participants) + 1) + 30
    reply_meta: dict[str, Any] = {}
    reply: dict[str, torch.Tensor] = {}
    result = None

    def train() -> Any:
        done = trainer.fit(weights, x, y, epochs=fleet.epochs[partition], config=meta["config"],
                           seed=client_seed(cfg.seed, rnd, partition), memory=memory, client=partition)
        slow = fleet.slowness(partition)
        if slow > 1:
            time.sleep(done.compute_s * (slow - 1))
        return done

    # Training needs only the round's weights, so it runs beside the stages before the update's
    # (SecAgg+'s keys and shares: round trips that wait for every client) instead of after them.
    # Leaving the block waits for it: the next round's training must not overlap this one's.
    with ThreadPoolExecutor(1, thread_name_prefix="train") as pool:
        trains = stop is None or client.stages.index(stop) > client.stages.index(client.result_stage)
        training = pool.submit(train) if trains else None
        try:
            for stage in client.stages:
                if stop == stage:
                    log.info("round %d: dropping out at stage %r (fleet.dropout, fleet.drop_stage)", rnd, stage)
                    return "skipped"
                extra: dict[str, Any] = {}
                if stage == client.result_stage:
                    result = training.result()
                    extra = {"num_examples": result.num_examples, "loss": result.loss}
                message = client.message(stage, reply_meta, reply, None if result is None else result.delta)
                reply_meta, reply = wire.unpack(conn.call("Secure", wire.pack(
                    {**me, "round": rnd, "stage": stage, **extra}, message), timeout=timeout))
                if reply_meta.get("excluded"):
                    console.print(f"round {rnd}: out of the secure aggregation after stage {stage!r}: "
                                  f"{reply_meta['excluded']}", highlight=False)
                    return "rejected"
                if reply_meta.get("done"):
                    break
        except ProtocolError as err:
            console.print(f"round {rnd}: leaving the secure aggregation: {err}", highlight=False)
            return "rejected"
    console.print(f"round {rnd}: loss {result.loss:.4f}, {mechanism.sent} sent (secure aggregation)",
                  highlight=False)
    return "rounds"


def run_client(cfg: FlRunConfig, *, server: str, token: str, partition: int, certs: str | Path | None,
               name: str | None = None, retry_for_s: float = 120.0, console: Console | None = None,
               privacy_state: str | Path | None = None, he_key: str | Path | None = None) -> dict[str, Any]:
    """Take part until the server says training is over; returns this client's tally.

    ``certs`` is this client's folder from ``shoal fl certs`` (``OUT/NAME``),
    or ``OUT`` with ``name``; None runs without TLS. ``privacy_state``: under ``fl.local_privacy``, the
    file that keeps this client's ledger across restarts (read if present, rewritten after each round).
    ``he_key``: under ``fl.secure: ckks``, the secret key file from ``shoal fl keys``.
    """
    console = console or Console()
    if not 0 <= partition < cfg.fl.clients:
        raise ValueError(f"--partition {partition}: must be in [0, {cfg.fl.clients}) (fl.clients)")
    mechanism = grpc_mechanism(cfg, he_key, server=False)
    torch.set_num_threads(1)
    data = build_dataset(cfg.data.dataset)
    x, y = fetch(data.train, client_partitions(cfg, data)[partition].tolist())
    torch.manual_seed(cfg.seed)
    trainer = LocalTrainer(build_model(cfg.model, data), cfg.optimizer, cfg.data.batch_size,
                           build_codec(cfg.fl.codec), loss_fn=build_task(cfg.task).loss,
                           privacy=local_privacy(cfg))
    if trainer.privacy is not None and privacy_state is not None:
        trainer.privacy.load(Path(privacy_state), partition, len(y))
    memory = ErrorFeedback() if cfg.fl.codec.options.memory == "ef" else None
    fleet = Fleet(cfg)
    tls = None if certs is None else TlsFiles.client(Path(certs), name)
    me = {"token": token, "partition": partition}
    tally = {"rounds": 0, "accepted": 0, "rejected": 0, "skipped": 0}
    with Connection(server, tls, retry_for_s=retry_for_s,
                    max_message_bytes=int(cfg.server.max_update_bytes) + (1 << 20)) as conn:
        meta, _ = wire.unpack(conn.call("Join", wire.pack(me, {})))
        console.print(f"joined {server} as partition {partition} ({len(y)} samples); server at round "
                      f"{meta['round']}", highlight=False)
        # The last round fetched, and which server process answered last: rounds fetched from
        # an earlier process count for nothing with a later one (a restarted server opens the
        # round it died in again, and offers it to the clients selected for it).
        after, incarnation = 0, meta.get("incarnation")
        while True:
            meta, tensors = wire.unpack(conn.call(
                "Task", wire.pack({**me, "after": after, "incarnation": incarnation}, {}), timeout=60))
            if meta.get("incarnation", incarnation) != incarnation:
                after, incarnation = 0, meta["incarnation"]
            if meta.get("done"):
                console.print(f"training is over (round {meta.get('round')})", highlight=False)
                break
            if meta.get("wait"):
                continue
            rnd = meta["round"]
            after = rnd
            secure = "secure" in meta["config"]
            if fleet.drops(rnd, partition) and not secure:  # a secure round drops at fleet.drop_stage
                tally["skipped"] += 1
                log.info("round %d: dropping out (fleet.dropout)", rnd)
                continue
            if trainer.privacy is not None and not trainer.privacy.allows(partition, len(y), fleet.epochs[partition]):
                tally["skipped"] += 1
                console.print(f"round {rnd}: sitting out: another round would take this client's epsilon past "
                              f"fl.local_privacy's target_epsilon", highlight=False)
                continue
            if secure:
                if mechanism is None:
                    raise ValueError(f"round {rnd} is a secure round, and this client's config has no fl.secure")
                outcome = _secure_round(conn, cfg, me, meta, tensors["weights"], trainer, fleet, x, y, memory,
                                        partition, console, mechanism)
                tally[outcome] += 1
                if outcome == "rounds":
                    tally["accepted"] += 1
                if trainer.privacy is not None and privacy_state is not None and outcome == "rounds":
                    trainer.privacy.save(Path(privacy_state), partition)
                continue
            started = time.perf_counter()
            result = trainer.fit(tensors["weights"], x, y, epochs=fleet.epochs[partition], config=meta["config"],
                                 seed=client_seed(cfg.seed, rnd, partition), memory=memory, client=partition)
            slow = fleet.slowness(partition)
            if slow > 1:
                time.sleep((time.perf_counter() - started) * (slow - 1))
            update = {f"p{k}": t for k, t in enumerate(result.payload.tensors)}
            reply, _ = wire.unpack(conn.call("Submit", wire.pack(
                {**me, "round": rnd, "num_examples": result.num_examples, "loss": result.loss}, update)))
            tally["rounds"] += 1
            if trainer.privacy is not None and privacy_state is not None:
                trainer.privacy.save(Path(privacy_state), partition)
            tally["accepted" if reply["accepted"] else "rejected"] += 1
            spent = "" if trainer.privacy is None else (
                f", epsilon {trainer.privacy.ledger(partition, len(y)).spent():.3g} (local DP-SGD)")
            console.print(f"round {rnd}: loss {result.loss:.4f}{spent}, sent {result.payload.wire_bytes:,} bytes"
                          + ("" if reply["accepted"] else f" — not accepted: {reply['reason']}"), highlight=False)
    if trainer.privacy is not None:
        tally["local_privacy"] = trainer.privacy.report()
    return tally
