"""What the server side of a federation holds and does each round, shared by
``shoal fl simulate`` and ``shoal fl server``.

:class:`Federation` owns the global weights, the strategy, the test set and
the run's outputs. Each round it samples clients (reproducibly: the draw
depends on the seed, the round and the sorted available clients only),
validates and decodes their updates, aggregates, evaluates and writes one
``metrics.jsonl`` line. Fleet conditions are drawn per client and round from
the seed, so a simulation and a real fleet with the same config drop, slow
down and size the same clients.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from shoal.comm.codecs.base import Payload, build_codec
from shoal.data import build_dataset
from shoal.data.partition import partition
from shoal.data.shard import fetch
from shoal.fl.config import FlRunConfig
from shoal.fl.local import FlatWeights
from shoal.fl.norm_bound import bound_updates
from shoal.fl.strategies.base import ClientResult, build_fed_strategy
from shoal.metrics.summary import write_json_atomic
from shoal.metrics.writer import MetricsWriter
from shoal.models.build import build_model, count_parameters
from shoal.fl.privacy.plan import sampling_rate, with_noise_multiplier
from shoal.engine.evaluate import evaluate_task
from shoal.tasks.base import build_task

log = logging.getLogger("shoal.fl")


class UpdateRejected(ValueError):
    """A client update that does not fit the model or the round; the message is the reason."""


@dataclass
class RoundTally:
    """Who took part in a round and what crossed the network."""

    selected: list[int] = field(default_factory=list)
    results: list[ClientResult] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # never answered (dropout, died, disconnected)
    late: list[int] = field(default_factory=list)  # answered after the deadline
    rejected: list[int] = field(default_factory=list)  # answered with an invalid update
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    # Under fl.secure: the protocol's sum (shoal.fl.secure.secagg.Aggregate) or why the round aborted,
    # and each participant's (loss, examples), which travel in the clear beside the masked input.
    secure: Any = None
    secure_error: str | None = None
    losses: dict[int, tuple[float, int]] = field(default_factory=dict)
    secure_overhead_bytes: int = 0
    secure_masked_bytes: int = 0


class Fleet:
    """Per-client conditions drawn from the seed: the same on the server, in
    every client process and in a simulation."""

    def __init__(self, cfg: FlRunConfig):
        fleet, rng = cfg.fl.fleet, np.random.default_rng([cfg.seed, 17])
        self.seed, self.dropout, self.factor = cfg.seed, fleet.dropout, fleet.slow_factor
        self.slow = set(rng.permutation(cfg.fl.clients)[: round(fleet.slow_fraction * cfg.fl.clients)].tolist())
        top = fleet.local_epochs_max or cfg.fl.local_epochs
        self.epochs = rng.integers(cfg.fl.local_epochs, top + 1, size=cfg.fl.clients).tolist()

    def drops(self, rnd: int, client: int) -> bool:
        """Whether this client fails to answer this round (fleet.dropout)."""
        return self.dropout > 0 and np.random.default_rng([self.seed, rnd, client, 1]).random() < self.dropout

    def slowness(self, client: int) -> float:
        return self.factor if client in self.slow else 1.0


def client_partitions(cfg: FlRunConfig, data: Any) -> list[np.ndarray]:
    """Every client's sample indices (the same wherever the config and data are the same)."""
    labels = fetch(data.train, list(range(len(data.train))))[1].numpy()
    return partition(cfg.fl.partition, labels, cfg.fl.clients, cfg.seed)


def claim_output(out: Path, mode: str) -> None:
    """Mark ``out`` as this mode's (``simulation``, ``server``, ``benchmark``); refuse one that holds
    another mode's results, which this run would overwrite (both write summary.json and metrics.jsonl)."""
    marker = out / "fl-run.json"
    try:
        held = json.loads(marker.read_text()).get("mode")
    except (OSError, ValueError, AttributeError):
        held = None
    if held is not None and held != mode:
        raise ValueError(f"out: {out} holds a federated {held}'s results, which this {mode} would overwrite; "
                         "pass --out DIR (or set out: in the config) for this one")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"mode": mode})


class Federation:
    def __init__(self, cfg: FlRunConfig, out: str | Path, *, start_round: int = 0, console: Console | None = None,
                 mode: str = "simulation"):
        # Calibrated here, once, before anything is written: config.yaml, the ledger and the
        # summary carry the noise the run uses, and a budget no noise can fit loses nothing.
        calibrated = cfg.fl.privacy is not None and cfg.fl.privacy.noise_multiplier is None
        cfg = with_noise_multiplier(cfg)
        self.cfg, self.noise_calibrated = cfg, calibrated
        self.out = Path(out)
        claim_output(self.out, mode)
        (self.out / "config.yaml").write_text(cfg.to_yaml())
        self.console = console or Console()
        if calibrated:
            privacy = cfg.fl.privacy
            self.console.print(f"fl.privacy: noise multiplier {privacy.noise_multiplier:.4g}, calibrated to "
                               f"target_epsilon {privacy.target_epsilon:g} at delta {privacy.delta:g} over "
                               f"{cfg.fl.rounds} rounds (sampling rate {sampling_rate(cfg.fl):.4g})",
                               highlight=False)
        self.started = time.perf_counter()
        self.data = build_dataset(cfg.data.dataset)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.data)
        self.task = build_task(cfg.task)
        self.flat = FlatWeights(self.model)
        self.weights = self.flat.get()
        strategy = build_fed_strategy(cfg.fl.strategy)
        # DP wraps whatever strategy was chosen; kept apart too, for its per-round record.
        self.privacy = None
        if cfg.fl.privacy is not None:
            from shoal.fl.privacy.dp_fedavg import DpFedAvg  # dp-accounting: only private runs import it

            self.privacy = DpFedAvg(strategy, cfg.fl.privacy, clients_per_round=cfg.fl.clients_per_round,
                                    seed=cfg.seed, clients=cfg.fl.clients)
        self.strategy = self.privacy or strategy
        self.secure = cfg.fl.secure.target(cfg.fl.secure.options) if cfg.fl.secure is not None else None
        self.codec = build_codec(cfg.fl.codec)
        self.template = self.codec.encode(torch.zeros(self.flat.numel))  # layout of every client's payload
        self.parts = client_partitions(cfg, self.data)
        self.fleet = Fleet(cfg)
        self.round = start_round
        self.uplink_bytes = self.downlink_bytes = 0
        self.history: list[dict[str, Any]] = []
        self.budget_spent = False  # the privacy budget stopped the run
        self.rounds_to_target: int | None = None
        self.time_to_target_s: float | None = None
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_step=start_round if start_round else None)

    def restore(self, weights: torch.Tensor, history: list[dict[str, Any]]) -> None:
        """Continue after the last completed round of an earlier server (its weights and metrics)."""
        self.weights = weights
        self.history = list(history)
        if history:
            last = history[-1]
            self.round = last["round"]
            self.uplink_bytes, self.downlink_bytes = last["uplink_bytes_total"], last["downlink_bytes_total"]
            self.started -= last["time_s"]  # the clock goes on from where it stopped
            for record in history:
                self._note_target(record)

    def _note_target(self, record: dict[str, Any]) -> None:
        target = self.cfg.fl.target_accuracy
        if target is not None and self.rounds_to_target is None and record.get("test_accuracy", 0) >= target:
            self.rounds_to_target, self.time_to_target_s = record["round"], record["time_s"]

    # --- per client, per round --------------------------------------------------
    def sample(self, rnd: int, available: list[int]) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, rnd])
        chosen = self.strategy.sample(rnd, [str(c) for c in sorted(available)], self.cfg.fl.clients_per_round, rng)
        return [int(c) for c in chosen]

    def secure_setup(self, rnd: int, participants: list[int]) -> Any:
        """The round's secure-aggregation setup. Under fl.privacy the clients add the noise: its std on the
        sum is z * (C + the fixed-point rounding's bound), so rounding cannot push one update past what
        the noise covers."""
        noise_std = 0.0
        if self.privacy is not None:
            noise_std = self.privacy.delta_multiplier * (self.privacy.clip_norm + self.secure.rounding_bound(
                self.flat.numel))
        return self.secure.setup(rnd, participants, self.weights, noise_std)

    def decode(self, client: int, tensors: list[torch.Tensor], num_examples: int) -> torch.Tensor:
        """Check a client's payload against the model's layout and decode it;
        :class:`UpdateRejected` says what is wrong."""
        expected = self.template.tensors
        if len(tensors) != len(expected):
            raise UpdateRejected(f"{len(tensors)} tensors, the codec sends {len(expected)}")
        for k, (got, want) in enumerate(zip(tensors, expected)):
            if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
                raise UpdateRejected(f"tensor {k} is {got.dtype} {tuple(got.shape)}, the model needs "
                                     f"{want.dtype} {tuple(want.shape)}")
            if got.is_floating_point() and not torch.isfinite(got).all():
                raise UpdateRejected(f"tensor {k} holds NaN or infinite values")
        # An update's weight in the aggregate is its sample count: the partition's
        # true size, which the server knows, not a number the client may inflate.
        held = len(self.parts[client])
        if num_examples != held:
            raise UpdateRejected(f"num_examples {num_examples}: partition {client} holds {held} training samples")
        try:  # right shapes can still hold an impossible payload (an index past the end, a bitmap's count)
            delta = self.codec.decode(Payload(list(tensors), self.template.ctx)).reshape(-1).float()
        except (ValueError, IndexError, RuntimeError) as err:
            raise UpdateRejected(f"the payload does not decode: {err}") from None
        if not torch.isfinite(delta).all():
            raise UpdateRejected("the decoded update holds NaN or infinite values")
        return delta

    # --- the round's end ----------------------------------------------------------
    def finish_round(self, rnd: int, tally: RoundTally) -> dict[str, Any]:
        """Aggregate what arrived, evaluate, log; returns the metrics line."""
        self.round = rnd
        if self.secure is not None:
            return self._finish_secure_round(rnd, tally)
        server = self.cfg.server
        kept, clipped, too_large = bound_updates(tally.results, limit=server.max_update_norm,
                                                 median_multiple=server.max_update_norm_median,
                                                 action=server.update_norm_action)
        for client in clipped:
            log.warning("round %d: partition %s's update clipped to the norm bound", rnd, client)
        for client in too_large:
            log.warning("round %d: partition %s's update rejected: its norm is over the bound", rnd, client)
        tally.rejected += [int(c) for c in too_large]
        tally.results = kept
        aggregated = len(tally.results) >= self.cfg.fl.min_clients
        if aggregated:
            self.weights = self.strategy.aggregate(rnd, self.weights, tally.results)
        self.uplink_bytes += tally.uplink_bytes
        self.downlink_bytes += tally.downlink_bytes
        record: dict[str, Any] = {
            "step": rnd, "round": rnd, "time_s": time.perf_counter() - self.started,
            "participating": len(tally.results), "selected": len(tally.selected), "dropped": len(tally.dropped),
            "late": len(tally.late), "rejected": len(tally.rejected), "aggregated": aggregated,
            "dropped_clients": tally.dropped, "rejected_clients": tally.rejected,
            "norm_clipped_clients": [int(c) for c in clipped], "norm_rejected_clients": [int(c) for c in too_large],
            "uplink_bytes": tally.uplink_bytes, "downlink_bytes": tally.downlink_bytes,
            "uplink_bytes_total": self.uplink_bytes, "downlink_bytes_total": self.downlink_bytes,
        }
        if aggregated and self.privacy is not None:
            record.update(self.privacy.last_round)
        if tally.results:
            record["loss"] = sum(r.loss * r.num_examples for r in tally.results) / sum(
                r.num_examples for r in tally.results)
        return self._record(rnd, record)

    def _record(self, rnd: int, record: dict[str, Any]) -> dict[str, Any]:
        """Evaluate when the round calls for it, then keep and write the round's metrics line."""
        if rnd % self.cfg.fl.eval_every == 0 or rnd == self.cfg.fl.rounds:
            record.update(self.evaluate())
            self._note_target(record)
        self.history.append(record)
        self.metrics.write(record)
        return record

    def _finish_secure_round(self, rnd: int, tally: RoundTally) -> dict[str, Any]:
        """Aggregate the protocol's sum: the mean over the clients it holds (DP-FedAvg: over the expected
        clients_per_round, its noise already in the sum), handed to the strategy as one result."""
        agg = tally.secure
        clients = agg.clients if agg is not None else []
        aggregated = agg is not None and len(clients) >= self.cfg.fl.min_clients
        losses = [tally.losses[c] for c in clients if c in tally.losses]
        loss = sum(l * n for l, n in losses) / sum(n for _, n in losses) if losses else None
        if aggregated:
            examples = sum(len(self.parts[c]) for c in clients)
            if self.privacy is not None:
                self.weights = self.privacy.aggregate_sum(rnd, self.weights, agg.total, loss or 0.0,
                                                          rounding=self.secure.rounding_bound(self.flat.numel))
            else:
                mean = ClientResult("secure", agg.total / len(clients), examples, loss or 0.0)
                self.weights = self.strategy.aggregate(rnd, self.weights, [mean])
        self.uplink_bytes += tally.uplink_bytes
        self.downlink_bytes += tally.downlink_bytes
        record: dict[str, Any] = {
            "step": rnd, "round": rnd, "time_s": time.perf_counter() - self.started,
            "participating": len(clients) if aggregated else 0, "selected": len(tally.selected),
            "dropped": len(tally.dropped), "late": len(tally.late), "rejected": len(tally.rejected),
            "aggregated": aggregated, "dropped_clients": tally.dropped, "rejected_clients": tally.rejected,
            "secure_clients": len(clients), "secure_aborted": tally.secure_error,
            "forged_shares": [list(f) for f in agg.forged] if agg is not None else [],
            "uplink_bytes": tally.uplink_bytes, "downlink_bytes": tally.downlink_bytes,
            "secure_overhead_bytes": tally.secure_overhead_bytes,
            "uplink_bytes_total": self.uplink_bytes, "downlink_bytes_total": self.downlink_bytes,
        }
        if aggregated and self.privacy is not None:
            record.update(self.privacy.last_round)
        if loss is not None:
            record["loss"] = loss
        if tally.secure_error is not None:
            log.warning("%s", tally.secure_error)
        return self._record(rnd, record)

    def evaluate(self) -> dict[str, float]:
        """The global model's test metrics as metrics.jsonl keys: test_loss, test_accuracy, the task's others."""
        self.flat.set(self.weights)
        metrics = evaluate_task(self.model, self.data.test, self.task, batch_size=self.cfg.data.eval_batch_size,
                                device=torch.device("cpu"), rank=0, world_size=1)
        return {f"test_{name}": value for name, value in metrics.items()}

    def done(self) -> bool:
        # The planned end first: a run calibrated to spend its whole budget in fl.rounds ends
        # there, not stopped by the budget it was planned to spend.
        if self.round >= self.cfg.fl.rounds:
            return True
        if self.privacy is not None and not self.privacy.round_allowed():
            if not self.budget_spent:
                self.budget_spent = True
                self.console.print(f"round {self.round + 1} would take epsilon past fl.privacy.target_epsilon="
                                   f"{self.cfg.fl.privacy.target_epsilon:g} (spent "
                                   f"{self.privacy.ledger.spent():.3g}): stopping", highlight=False)
            return True
        return self.cfg.fl.stop_at_target and self.rounds_to_target is not None

    def close(self, **extra: Any) -> dict[str, Any]:
        """Write summary.json and curves.png; return the summary."""
        self.metrics.close()
        evals = [r for r in self.history if "test_accuracy" in r]
        if not evals or evals[-1]["round"] != self.round:
            evals.append({"round": self.round, **self.evaluate()})
        fl = self.cfg.fl
        summary = {
            "final_accuracy": evals[-1]["test_accuracy"], "final_loss": evals[-1]["test_loss"],
            "best_accuracy": max(r["test_accuracy"] for r in evals),
            "rounds": self.round, "target_accuracy": fl.target_accuracy,
            "rounds_to_target": self.rounds_to_target, "time_to_target_s": self.time_to_target_s,
            "uplink_bytes": self.uplink_bytes, "downlink_bytes": self.downlink_bytes,
            "wall_time_s": time.perf_counter() - self.started,
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "clients": fl.clients, "clients_per_round": fl.clients_per_round,
            # Clients whose update was aggregated, per round on average (fewer than clients_per_round
            # when fewer are connected, drop out or miss the deadline).
            "mean_participants": _mean([r["participating"] for r in self.history if "participating" in r]),
            "strategy": fl.strategy.spec(), "partition": fl.partition.spec(), "codec": fl.codec.spec(),
            **({"secure": fl.secure.spec(),
                "secure_aborted_rounds": sum(1 for r in self.history if r.get("secure_aborted"))}
               if fl.secure is not None else {}),
            "model": self.cfg.model.name, "dataset": self.cfg.data.dataset.name, "parameters": count_parameters(self.model),
            "out": str(self.out),
            **({"privacy": {**self.privacy.ledger.report(), "clip": self.privacy.clip_norm,
                            "adaptive": self.cfg.fl.privacy.adaptive, "where": self.cfg.fl.privacy.where,
                            "noise_calibrated": self.noise_calibrated,
                            "stopped_by_budget": self.budget_spent}} if self.privacy is not None else {}),
            **extra,
        }
        write_json_atomic(self.out / "summary.json", summary)
        from shoal.metrics.plots import plot_curves  # matplotlib: a second of import the clients never need

        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png",
                    title=f"{self.cfg.model.name} / {fl.strategy.name} / {fl.clients} clients")
        return summary

    def log_round(self, record: dict[str, Any]) -> None:
        """One printed line per evaluation."""
        if "test_accuracy" in record:
            self.console.print(
                f"round {record['round']:>5}  clients {record['participating']:>3}/{record['selected']:<3}  "
                f"test loss {record['test_loss']:.4f}  test acc {record['test_accuracy']:.4f}  "
                f"{record['time_s']:7.1f}s")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
