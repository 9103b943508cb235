"""Flower 1.42's simulation (Ray) on exactly shoal's federated work: the ``flower`` row of ``shoal bench fl --flower``.

The same work, built by shoal's own builders in every Flower process: the config's dataset and
partition (:func:`~shoal.fl.federation.client_partitions`), its model from the same seed, and each
client's local training through :class:`~shoal.fl.local.LocalTrainer` (the config's optimiser, batch
size and epochs; the client's seed from the seed, the round and the client, as in shoal). Flower
does the rest as it does for its users: ``run_simulation`` over Ray with one SuperNode per client,
its ``FedAvg`` strategy sampling ``clients_per_round / clients`` of them each round, its message
serialisation, and a centralised ``evaluate_fn`` on the config's test set every ``eval_every`` rounds.

Run as its own process (its memory is then its own):

    python -m shoal.bench.flower_fl CONFIG OUT [--set KEY=VALUE ...]

It writes ``OUT/flower-rounds.jsonl``: one line per evaluated round with its test accuracy and the
wall-clock time it was measured (Unix seconds). It stops once ``fl.target_accuracy`` is reached when
``fl.stop_at_target`` is set (the strategy's loop is left from its evaluation, as shoal's run ends
there too). Flower needs the ``bench-flower`` extra in a separate environment; it is never needed to
train.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

_WORK: dict[str, Any] = {}  # per process: the federation's pieces, built once


class TargetReached(Exception):
    """Raised from the evaluation to leave Flower's round loop at the target."""


def work(config: str, overrides: list[str]) -> dict[str, Any]:
    """The config's data, partitions, model and local trainer, built as shoal builds them."""
    key = json.dumps([config, overrides])
    if _WORK.get("key") != key:
        from shoal.comm.codecs.base import build_codec
        from shoal.data import build_dataset
        from shoal.fl.config import load_fl_config
        from shoal.fl.federation import client_partitions
        from shoal.fl.local import FlatWeights, LocalTrainer
        from shoal.models.build import build_model
        from shoal.tasks.base import build_task

        torch.set_num_threads(1)  # as shoal fl simulate: small client batches
        cfg = load_fl_config(config, overrides)
        data = build_dataset(cfg.data.dataset)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data)
        task = build_task(cfg.task)
        trainer = LocalTrainer(model, cfg.optimizer, cfg.data.batch_size, build_codec(cfg.fl.codec), loss_fn=task.loss)
        _WORK.clear()
        _WORK.update(key=key, cfg=cfg, data=data, model=model, task=task, trainer=trainer,
                     flat=FlatWeights(model), parts=client_partitions(cfg, data))
    return _WORK


def apps(config: str, overrides: list[str], out: Path) -> tuple[Any, Any]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from shoal.data.shard import fetch
    from shoal.engine.evaluate import evaluate_task
    from shoal.fl.local import client_seed

    client = ClientApp()

    @client.train()
    def train(message: Message, context: Context) -> Message:
        w = work(config, overrides)
        cfg, model, flat = w["cfg"], w["model"], w["flat"]
        who = int(context.node_config["partition-id"])
        rnd = int(message.content["config"]["server-round"])
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        weights = flat.get()
        x, y = fetch(w["data"].train, w["parts"][who].tolist())
        result = w["trainer"].fit(weights, x, y, epochs=cfg.fl.local_epochs, config={},
                                  seed=client_seed(cfg.seed, rnd, who), client=who)
        flat.set(weights + result.delta)
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": int(result.num_examples),
                                                     "train_loss": float(result.loss)})})
        return Message(reply, reply_to=message)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        w = work(config, overrides)
        cfg, model = w["cfg"], w["model"]
        rounds_file = out / "flower-rounds.jsonl"

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
            if rnd == 0 or (rnd % cfg.fl.eval_every and rnd != cfg.fl.rounds):  # and the last, as shoal
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate_task(model, w["data"].test, w["task"], batch_size=cfg.data.eval_batch_size,
                                    device=torch.device("cpu"), rank=0, world_size=1)
            record = {"round": rnd, "test_accuracy": metrics["accuracy"], "at": time.time()}
            with open(rounds_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.fl.stop_at_target and cfg.fl.target_accuracy is not None \
                    and metrics["accuracy"] >= cfg.fl.target_accuracy:
                raise TargetReached(rnd)
            return MetricRecord({"accuracy": metrics["accuracy"]})

        strategy = FedAvg(fraction_train=cfg.fl.clients_per_round / cfg.fl.clients, fraction_evaluate=0.0,
                          min_train_nodes=cfg.fl.clients_per_round, min_available_nodes=cfg.fl.clients)
        try:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.fl.rounds,
                           evaluate_fn=evaluate)
        except TargetReached:
            pass

    return server, client


def tree_memory(root: int) -> tuple[int, int]:
    """(PSS bytes, processes) of ``root`` and every process below it: Ray's raylet, GCS and workers
    included; proportional set sizes, so pages shared between them count once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
                    break
        except OSError:
            continue
    return total, count


def timed(command: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``command``; its start, end, and its process tree's peak memory (sampled every 0.25 s)."""
    import subprocess

    peak = {"pss": 0, "processes": 0}
    started = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while child.poll() is None:
            pss, count = tree_memory(child.pid)
            peak["pss"], peak["processes"] = max(peak["pss"], pss), max(peak["processes"], count)
            time.sleep(0.25)
    return {"started": started, "ended": time.time(), "returncode": child.returncode,
            "peak_memory_mb": peak["pss"] / 2**20, "processes": peak["processes"]}


def compare(config: Path, overrides: list[str], out: Path, *, repeat: int = 1,
            log: Any = print) -> list[dict[str, Any]]:
    """``shoal fl simulate`` and Flower's simulation on the same work, one after the other, ``repeat`` times:
    rounds and seconds to the target (seconds from the command's start) and peak memory. Rows: one per
    engine, medians over the repeats, and the ratios of shoal's figures to Flower's."""
    import statistics
    import sys

    from shoal.fl.config import load_fl_config

    overrides = [*overrides, "fl.stop_at_target=true"]  # both end at the target: shoal's time is its command's
    cfg = load_fl_config(config, overrides)
    if cfg.fl.target_accuracy is None:
        raise ValueError("fl.target_accuracy: the comparison needs a target (time and rounds to it)")
    if cfg.fl.strategy.name != "fedavg" or cfg.fl.codec.name != "none" or cfg.fl.privacy or cfg.fl.secure:
        raise ValueError("fl.strategy: the Flower row runs plain FedAvg with no codec, privacy or secure "
                         f"aggregation; this config has {cfg.fl.strategy.spec()}, codec {cfg.fl.codec.spec()}")
    sets = [a for o in overrides for a in ("--set", o)]
    runs: dict[str, list[dict[str, Any]]] = {"shoal": [], "flower": []}
    for k in range(repeat):
        for engine in ("shoal", "flower"):
            where = out / "runs" / f"{engine}-{k}"
            where.mkdir(parents=True, exist_ok=True)
            command = ([sys.executable, "-m", "shoal.cli", "fl", "simulate", str(config), "--out", str(where), *sets]
                       if engine == "shoal" else
                       [sys.executable, "-m", "shoal.bench.flower_fl", str(config), str(where), *sets])
            log(f"{engine} run {k + 1}/{repeat}: {' '.join(command[2:5])} ...")
            run = timed(command, where / "output.log")
            run.update(_to_target(engine, where, run, cfg.fl.target_accuracy))
            log(f"  {engine}: rounds to {cfg.fl.target_accuracy:g}: {run['rounds_to_target']}, "
                f"{run['time_to_target_s']} s, peak {run['peak_memory_mb']:.0f} MB over {run['processes']} processes")
            runs[engine].append(run)
    rows = []
    for engine, done in runs.items():
        row: dict[str, Any] = {"label": engine, "repeats": len(done),
                               "failed": any(r["returncode"] != 0 or r["rounds_to_target"] is None for r in done)}
        for key in ("rounds_to_target", "time_to_target_s", "peak_memory_mb", "processes"):
            values = [r[key] for r in done if r[key] is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_runs"] = [r[key] for r in done]
        rows.append(row)
    shoal, flower = rows
    if not shoal["failed"] and not flower["failed"]:
        shoal["speedup_vs_flower"] = flower["time_to_target_s"] / shoal["time_to_target_s"]
        shoal["memory_vs_flower"] = shoal["peak_memory_mb"] / flower["peak_memory_mb"]
        shoal["rounds_vs_flower"] = shoal["rounds_to_target"] / flower["rounds_to_target"]
    return rows


def _to_target(engine: str, where: Path, run: dict[str, Any], target: float) -> dict[str, Any]:
    """Rounds to the target and seconds from the command's start to the evaluation that reached it (shoal's
    run ends there: its whole command, the summary written after it included)."""
    if engine == "shoal":
        try:
            summary = json.loads((where / "summary.json").read_text())
        except (OSError, ValueError):
            return {"rounds_to_target": None, "time_to_target_s": None}
        reached = summary.get("rounds_to_target")
        return {"rounds_to_target": reached,
                "time_to_target_s": round(run["ended"] - run["started"], 2) if reached is not None else None}
    for line in (where / "flower-rounds.jsonl").read_text().splitlines() if (where / "flower-rounds.jsonl").exists() else ():
        record = json.loads(line)
        if record["test_accuracy"] >= target:
            return {"rounds_to_target": record["round"], "time_to_target_s": round(record["at"] - run["started"], 2)}
    return {"rounds_to_target": None, "time_to_target_s": None}


def main() -> None:
    parser = argparse.ArgumentParser(description="Flower's simulation of a shoal federated config")
    parser.add_argument("config")
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from flwr.simulation import run_simulation

    from shoal.fl.config import load_fl_config

    cfg = load_fl_config(args.config, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flower-rounds.jsonl").unlink(missing_ok=True)
    server, client = apps(args.config, args.overrides, args.out)
    cores = len(os.sched_getaffinity(0))
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.fl.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cores, "include_dashboard": False}})


if __name__ == "__main__":
    main()
