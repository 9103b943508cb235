"""Latency of ``shoal serve`` on loopback: submit and list at a fixed request rate with a long queue.

    python benchmarks/serve_latency.py [--queued 10000] [--rate 200] [--seconds 30] [--out runs/serve-latency]

1. Start a real ``shoal serve`` (FIFO, 2 CPUs, SQLite in WAL mode) and one job holding both CPUs, so
   that everything queued behind it stays pending.
2. Queue ``--queued`` jobs straight into its database (the setup, not what is measured).
3. Send ``--rate`` requests a second for ``--seconds`` (open loop: each at its scheduled instant, from
   a pool of threads), alternating a submit (a new pending job) and a list of the caller's first 100
   jobs; each request's latency is from its scheduled instant to its answer, so a service that falls
   behind is charged for the wait.
4. Report p50/p95/p99 per kind, and the service's own last pass and decision times (``/node``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import insert

from shoal.platform.client import Client
from shoal.platform.spec import JobSpec
from shoal.platform.store import JobStore, jobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8479)
    parser.add_argument("--out", type=Path, default=Path("runs/serve-latency"))
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="shoal-serve-latency-"))
    server = subprocess.Popen([sys.executable, "-m", "shoal.cli", "serve", "--state", str(state), "--port",
                               str(args.port), "--cpus", "2", "--gpus", "0", "--no-cgroups", "--policy", "fifo"],
                              stdout=subprocess.DEVNULL, stderr=open(state / "serve.log", "w"))
    try:
        client = Client(f"http://127.0.0.1:{args.port}", None, retry_s=60)
        while not (state / "admin.token").is_file():
            time.sleep(0.1)
        client.token = (state / "admin.token").read_text().strip()
        blocker = client.submit({"kind": "command", "command": ["sleep", "3600"], "workers": 2})["id"]
        queue_behind(state / "jobs.db", args.queued)
        time.sleep(8)  # the service has read the long queue and settled
        rows = load(client, args.rate, args.seconds)
        node = client.node()
        client.cancel(blocker)
    finally:
        server.terminate()
        server.wait()
        print(f"the service's log: {state / 'serve.log'}")
    report = {"queued_at_start": args.queued, "rate": args.rate, "seconds": args.seconds,
              "pending_at_end": node["jobs"].get("pending"), "last_pass_ms": node["last_pass_ms"],
              "last_decision_ms": node["last_decision_ms"]}
    for kind in ("submit", "list"):
        lat = sorted(ms for k, ms, _ in rows if k == kind)
        report[kind] = {"requests": len(lat), "p50_ms": round(lat[len(lat) // 2], 2),
                        "p95_ms": round(lat[int(len(lat) * 0.95)], 2), "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
                        "mean_ms": round(statistics.fmean(lat), 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "requests.json").write_text(json.dumps([{"kind": k, "ms": round(ms, 2), "at_s": round(at, 3)}
                                                        for k, ms, at in sorted(rows, key=lambda r: r[2])]))
    print(json.dumps(report, indent=1))


def queue_behind(db: Path, count: int) -> None:
    spec = JobSpec(kind="command", command=["true"], workers=1).model_dump_json()
    now = time.time()
    store = JobStore(str(db))
    rows = [{"user": "admin", "name": f"queued-{i}", "kind": "command", "queue": "default", "spec": spec,
             "priority": 0, "state": "pending", "submitted": now + i * 1e-6, "attained": 0.0, "preemptions": 0,
             "attempt": 0, "changed": now, "pending_since": now} for i in range(count)]
    with store.engine.begin() as conn:
        conn.execute(insert(jobs), rows)
    store.close()


def load(client: Client, rate: float, seconds: float) -> list[tuple[str, float, float]]:
    spec = {"kind": "command", "command": ["true"], "workers": 1, "name": "load"}
    start = time.perf_counter() + 0.5
    results: list[tuple[str, float, float]] = []

    def one(i: int) -> None:
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        kind = "submit" if i % 2 == 0 else "list"
        if kind == "submit":
            client.submit(spec)
        else:
            client.list(limit=100)
        results.append((kind, (time.perf_counter() - at) * 1000, at - start))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(int(rate * seconds))))
    return results


if __name__ == "__main__":
    main()
