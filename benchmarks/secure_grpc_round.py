"""A federated round's time over real gRPC with mutual TLS: plain FedAvg against SecAgg+ and CKKS.

Starts ``shoal fl server`` and ``--clients`` ``shoal fl client`` processes on
loopback for each mode in turn (the same config, seed, partitions and
rounds: ``examples/fl_mnist1d.yaml``, every client selected every round; for
ckks a key pair from ``shoal fl keys``, the public key to the server, the
secret one to the clients) and prints, per mode, the median of the rounds'
durations (the differences of ``time_s`` in metrics.jsonl, the first round
left out: it waits for the clients to connect), the uplink per client and
round, and each secure mode's ratios to plain.

    python benchmarks/secure_grpc_round.py [--clients 10] [--rounds 8] [--modes plain,secagg,ckks]
                                           [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shoal(*args: object, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", *map(str, args)], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _run(cmd: list[object]) -> str:
    done = subprocess.run([sys.executable, "-m", "shoal.cli", *map(str, cmd)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def federation(tmp: Path, clients: int, rounds: int, extra: list[str]) -> dict[str, float]:
    """One federation to the end; its rounds' median seconds and uplink per client and round."""
    certs, db, out = tmp / "certs", tmp / "server.db", tmp / "run"
    sets = [f"fl.clients={clients}", f"fl.clients_per_round={clients}", f"fl.min_clients={clients}",
            f"fl.rounds={rounds}", "fl.eval_every=1000", "fl.stop_at_target=false", "server.address=127.0.0.1:0",
            f"server.db={db}", f"server.certs={certs}", f"out={out}", *extra]
    config = tmp / "fl.yaml"
    import yaml

    from shoal.fl.config import load_fl_config

    config.write_text(yaml.safe_dump(load_fl_config(ROOT / "examples/fl_mnist1d.yaml", sets).model_dump(mode="json")))
    _run(["fl", "certs", "--out", certs, *[f"--client=c{i}" for i in range(clients)]])
    tokens = [_run(["fl", "token", "add", f"c{i}", "--partition", i, "--config", config]) for i in range(clients)]
    server_key, client_key = [], []
    if "fl.secure=ckks" in extra:
        _run(["fl", "keys", config, "--out", tmp / "keys"])
        server_key, client_key = ["--he-key", tmp / "keys/ckks-public.key"], ["--he-key", tmp / "keys/ckks-secret.key"]
    procs = [_shoal("fl", "server", config, *server_key, log=tmp / "server.log")]
    try:
        while not (out / "server.json").exists():
            time.sleep(0.2)
        address = json.loads((out / "server.json").read_text())["address"]
        procs += [_shoal("fl", "client", config, "--server", address, "--token", tokens[i], "--partition", i,
                         "--name", f"c{i}", *client_key, log=tmp / f"client{i}.log") for i in range(clients)]
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise SystemExit(f"a process failed; see {tmp}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in records]
    durations = [b - a for a, b in zip(times, times[1:])]
    return {"round_s": statistics.median(durations),
            "uplink_per_client": statistics.median(r["uplink_bytes"] for r in records) / clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--modes", default="plain,secagg,ckks", help="plain first, then secagg and/or ckks")
    parser.add_argument("--set", action="append", default=[], help="a config override for every mode")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "plain" or not set(modes[1:]) <= {"secagg", "ckks"}:
        parser.error("--modes: plain, then secagg and/or ckks")
    results = {}
    for mode in modes:
        extra = [] if mode == "plain" else [f"fl.secure={mode}"]
        with tempfile.TemporaryDirectory(prefix=f"secure-{mode}-") as tmp:
            results[mode] = federation(Path(tmp), args.clients, args.rounds, [*args.set, *extra])
        print(f"{mode}: median round {results[mode]['round_s']:.3f} s, uplink per client and round "
              f"{results[mode]['uplink_per_client']:,.0f} bytes", flush=True)
    plain = results["plain"]
    for mode in modes[1:]:
        print(f"{mode} / plain: round time {results[mode]['round_s'] / plain['round_s']:.2f}x, "
              f"uplink {results[mode]['uplink_per_client'] / plain['uplink_per_client']:.3f}x")


if __name__ == "__main__":
    main()
