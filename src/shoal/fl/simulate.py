"""``shoal fl simulate``: every client of a federation on this machine.

Each round's clients train from the round's global weights on their own
partitions, in this process one after another on one model object
(``fl.processes: 1``) or spread over worker processes
(:mod:`shoal.fl.pool`); the outcomes are read in client order, so the
results are the same whatever the count. Nothing is serialised or sent, but
the uplink and downlink bytes are counted as the real protocol would send
them (the codec's payload up, the float32 weights down). A client that
raises stops the run with its error, naming the client and the round.
Dropouts, slow clients (whose emulated time, measured compute x slow_factor,
is checked against ``fl.deadline_s``) and per-client local epochs come from
the seed exactly as on a real fleet (:class:`~shoal.fl.federation.Federation`).
Every update goes through the server's validation and decoding
(:meth:`Federation.decode`): one with NaN or infinite values is rejected
and counted, as a real server would. A client's samples are fetched only
when it is sampled, so memory does not grow with ``fl.clients``.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.comm.memory import ErrorFeedback
from shoal.fl.config import FlRunConfig, load_fl_config
from shoal.fl.federation import Federation, RoundTally, UpdateRejected
from shoal.fl.local import LocalResult, LocalTrainer, client_seed, local_privacy
from shoal.fl.pool import ClientFailed, ClientPool, ClientTask, InProcess, WorkerDied, usable_cores
from shoal.fl.strategies.base import ClientResult

__all__ = ["ClientFailed", "WorkerDied", "simulate"]


def simulate(cfg: FlRunConfig | str | Path | dict[str, Any], *, overrides: list[str] | tuple[str, ...] = (),
             out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``fl.rounds`` rounds with ``fl.clients`` simulated clients; returns the summary.

    ``cfg``: a YAML path, a mapping or a :class:`FlRunConfig`; ``overrides``
    as ``--set`` (``"fl.rounds=50"``)."""
    if not isinstance(cfg, FlRunConfig) or overrides:
        cfg = load_fl_config(cfg, overrides)
    torch.set_num_threads(1)  # small client batches: threads cost more than they give
    console = Console()
    fed = Federation(cfg, out or cfg.out, console=console)
    trainer = LocalTrainer(fed.model, cfg.optimizer, cfg.data.batch_size, fed.codec, loss_fn=fed.task.loss,
                           privacy=local_privacy(cfg))
    memories: dict[int, ErrorFeedback] | None = {} if cfg.fl.codec.options.memory == "ef" else None
    everyone = list(range(cfg.fl.clients))
    down = fed.flat.numel * 4
    bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(), console=console, disable=not progress)
    # The workers are forked before the progress bar starts its drawing thread.
    with _clients(cfg, fed, trainer, console) as clients, bar:
        task = bar.add_task("rounds", total=cfg.fl.rounds, acc="-")
        while not fed.done():
            rnd = fed.round + 1
            tally = RoundTally(selected=fed.sample(rnd, everyone))
            tally.downlink_bytes = down * len(tally.selected)
            tasks, drop_at = _round_tasks(fed, trainer, rnd, tally, memories)
            outcomes = clients.run(rnd, fed.weights, tasks)
            updates: dict[int, torch.Tensor] = {}
            for t in tasks:  # in client order, however the clients were spread and whichever finished first
                outcome = outcomes[t.client]
                if outcome.error is not None:
                    raise ClientFailed(f"client {t.client} failed in round {rnd}: {outcome.error}") from outcome.cause
                if memories is not None:
                    memories[t.client] = outcome.memory
                _count(fed, rnd, tally, t.client, outcome.result, updates, drop_at)
            if fed.secure is not None:
                _secure_round(fed, rnd, tally, updates, drop_at)
            record = fed.finish_round(rnd, tally)
            if "test_accuracy" in record:
                bar.update(task, acc=f"{record['test_accuracy']:.4f}")
                if progress and (rnd % max(1, cfg.fl.rounds // 10) == 0 or fed.done()):
                    fed.log_round(record)
            bar.update(task, completed=rnd)
    extra = {"local_privacy": trainer.privacy.report()} if trainer.privacy is not None else {}
    if clients.worker_peak_memory_bytes is not None:
        extra["worker_peak_memory_bytes"] = clients.worker_peak_memory_bytes
    return fed.close(simulated=True, processes=clients.processes, **extra)


def _clients(cfg: FlRunConfig, fed: Federation, trainer: LocalTrainer, console: Console) -> InProcess | ClientPool:
    """Where the clients train: ``fl.processes`` workers (the usable cores unless set, at most a round's
    clients), or this process for one, for fl.local_privacy and where processes cannot be forked."""
    wanted = cfg.fl.processes or usable_cores()
    why_not = None
    if trainer.privacy is not None:
        # One noise stream and the clients' ledgers, drawn and kept in client order, here.
        why_not = "fl.local_privacy trains every client in this process (its noise is one stream, drawn in order)"
    elif "fork" not in multiprocessing.get_all_start_methods():
        why_not = "this platform cannot fork worker processes"
    if why_not is not None and cfg.fl.processes not in (None, 1):
        console.print(f"fl.processes={cfg.fl.processes}: {why_not}", highlight=False)
    processes = min(wanted, cfg.fl.clients_per_round)
    if why_not is not None or processes == 1:
        return InProcess(trainer, cfg.fl.codec, fed.data.train, fed.parts)
    return ClientPool(processes, trainer, cfg.fl.codec, fed.data.train, fed.parts, fed.flat.numel)


def _round_tasks(fed: Federation, trainer: LocalTrainer, rnd: int, tally: RoundTally,
                 memories: dict[int, ErrorFeedback] | None) -> tuple[list[ClientTask], dict[int, str]]:
    """The selected clients that train this round, in client order, and under fl.secure the stage at which
    each dropped one stops answering; the others that drop are counted in ``tally``."""
    cfg = fed.cfg
    config = fed.strategy.client_config(rnd)
    drop_at: dict[int, str] = {}
    tasks = []
    for client in tally.selected:
        samples, epochs = len(fed.parts[client]), fed.fleet.epochs[client]
        if fed.secure is not None and cfg.fl.fleet.drop_stage != "train" and fed.fleet.drops(rnd, client):
            drop_at[client] = cfg.fl.fleet.drop_stage
            tally.dropped.append(client)
            if drop_at[client] in ("keys", "shares"):
                continue  # gone before its update would be needed
        elif fed.fleet.drops(rnd, client) or (
                trainer.privacy is not None and not trainer.privacy.allows(client, samples, epochs)):
            tally.dropped.append(client)  # gone, or its local privacy budget is spent
            continue
        memory = memories.setdefault(client, ErrorFeedback()) if memories is not None else None
        tasks.append(ClientTask(client, samples, epochs, client_seed(cfg.seed, rnd, client), config, memory))
    return tasks, drop_at


def _count(fed: Federation, rnd: int, tally: RoundTally, client: int, result: LocalResult,
           updates: dict[int, torch.Tensor], drop_at: dict[int, str]) -> None:
    """What the server makes of one client's result: late, rejected, or one of the round's results."""
    late = result.compute_s * fed.fleet.slowness(client) > fed.cfg.fl.deadline_s
    if fed.secure is not None:  # the protocol's messages are counted in _secure_round
        tally.losses[client] = (result.loss, result.num_examples)
        updates[client] = result.delta
        if late:
            tally.late.append(client)
            drop_at.setdefault(client, "masked")  # the masked inputs' stage closes at the deadline
        return
    tally.uplink_bytes += result.payload.wire_bytes
    if late:
        tally.late.append(client)
        return
    try:  # the server's own checks, so a simulation accepts exactly what a server would
        delta = fed.decode(client, result.payload.tensors, result.num_examples)
    except UpdateRejected:
        tally.rejected.append(client)
        return
    tally.results.append(ClientResult(str(client), delta, result.num_examples, result.loss))


def _secure_round(fed: Federation, rnd: int, tally: RoundTally, updates: dict[int, torch.Tensor],
                  drop_at: dict[int, str]) -> None:
    """Run the round's secure aggregation over every selected client (the dropped ones stop at their stage)."""
    setup = fed.secure_setup(rnd, tally.selected)
    inputs = {c: updates.get(c, torch.zeros(fed.flat.numel)) for c in tally.selected
              if c in updates or drop_at.get(c) in ("keys", "shares")}
    aggregate, tally.secure_error, traffic = fed.secure.local_round(setup, inputs, fed.weights, drop_at=drop_at)
    tally.secure = aggregate
    tally.uplink_bytes += sum(traffic.uplink.values())
    tally.downlink_bytes += sum(traffic.downlink.values())
    tally.secure_overhead_bytes = traffic.overhead_bytes
