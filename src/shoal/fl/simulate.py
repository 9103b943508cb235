"""``shoal fl simulate``: every client of a federation in one process.

Clients run one after another on one model object, each from the round's
global weights on its own partition; nothing is serialised or sent, but the
uplink and downlink bytes are counted as the real protocol would send them
(the codec's payload up, the float32 weights down). A client that raises
stops the run with its error, naming the client and the round. Dropouts,
slow clients (whose emulated time, measured compute x slow_factor, is
checked against ``fl.deadline_s``) and per-client local epochs come from
the seed exactly as on a real fleet (:class:`~shoal.fl.federation.Federation`).
Every update goes through the server's validation and decoding
(:meth:`Federation.decode`): one with NaN or infinite values is rejected
and counted, as a real server would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.comm.memory import ErrorFeedback
from shoal.fl.config import FlRunConfig, load_fl_config
from shoal.fl.federation import Federation, RoundTally, UpdateRejected, client_data
from shoal.fl.local import LocalTrainer, client_seed, local_privacy
from shoal.fl.strategies.base import ClientResult


class ClientFailed(RuntimeError):
    """A simulated client raised; the run stops with its error."""


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
    data = [client_data(fed, c) for c in range(cfg.fl.clients)]
    memories: dict[int, ErrorFeedback] = {}
    use_memory = cfg.fl.codec.options.memory == "ef"
    everyone = list(range(cfg.fl.clients))
    down = fed.flat.numel * 4
    bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("rounds", total=cfg.fl.rounds, acc="-")
        while not fed.done():
            rnd = fed.round + 1
            tally = RoundTally(selected=fed.sample(rnd, everyone))
            tally.downlink_bytes = down * len(tally.selected)
            config = fed.strategy.client_config(rnd)
            drop_at: dict[int, str] = {}  # fl.secure: the stage at which a client stops answering
            updates: dict[int, torch.Tensor] = {}
            for client in tally.selected:
                x, y = data[client]
                if fed.secure is not None and cfg.fl.fleet.drop_stage != "train" and fed.fleet.drops(rnd, client):
                    drop_at[client] = cfg.fl.fleet.drop_stage
                    tally.dropped.append(client)
                    if drop_at[client] in ("keys", "shares"):
                        continue  # gone before its update would be needed
                elif fed.fleet.drops(rnd, client) or (
                        trainer.privacy is not None
                        and not trainer.privacy.allows(client, len(y), fed.fleet.epochs[client])):
                    tally.dropped.append(client)  # gone, or its local privacy budget is spent
                    continue
                memory = memories.setdefault(client, ErrorFeedback()) if use_memory else None
                try:
                    result = trainer.fit(fed.weights, x, y, epochs=fed.fleet.epochs[client], config=config,
                                         seed=client_seed(cfg.seed, rnd, client), memory=memory, client=client)
                except Exception as err:
                    raise ClientFailed(f"client {client} failed in round {rnd}: {type(err).__name__}: {err}") from err
                late = result.compute_s * fed.fleet.slowness(client) > cfg.fl.deadline_s
                if fed.secure is not None:  # the protocol's messages are counted below
                    tally.losses[client] = (result.loss, result.num_examples)
                    updates[client] = result.delta
                    if late:
                        tally.late.append(client)
                        drop_at.setdefault(client, "masked")  # the masked inputs' stage closes at the deadline
                    continue
                tally.uplink_bytes += result.payload.wire_bytes
                if late:
                    tally.late.append(client)
                    continue
                try:  # the server's own checks, so a simulation accepts exactly what a server would
                    delta = fed.decode(client, result.payload.tensors, result.num_examples)
                except UpdateRejected:
                    tally.rejected.append(client)
                    continue
                tally.results.append(ClientResult(str(client), delta, result.num_examples, result.loss))
            if fed.secure is not None:
                _secure_round(fed, rnd, tally, updates, drop_at)
            record = fed.finish_round(rnd, tally)
            if "test_accuracy" in record:
                bar.update(task, acc=f"{record['test_accuracy']:.4f}")
                if progress and (rnd % max(1, cfg.fl.rounds // 10) == 0 or fed.done()):
                    fed.log_round(record)
            bar.update(task, completed=rnd)
    extra = {"local_privacy": trainer.privacy.report()} if trainer.privacy is not None else {}
    return fed.close(simulated=True, **extra)



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
