"""``shoal fl simulate``'s seconds per round and peak memory: over worker processes, and at cross-device scale.

Each run is its own ``shoal fl simulate`` command (so its peak memory is its own), on an otherwise idle
machine. Seconds per round are the median of the gaps between consecutive rounds' ``time_s`` in
metrics.jsonl, the first round (forking the workers) and the last (the one evaluation) left out; each
row prints the median over ``--repeat`` runs, and its peak RSS from summary.json (the parent's, and
the largest worker's, which counts the pages it shares with the parent).

    python benchmarks/fl_processes.py processes [--processes 1 2] [--rounds 30] [--repeat 3]
        # examples/fl_mnist1d.yaml as it is (100 clients, 10 a round), --processes 1 against 2
    python benchmarks/fl_processes.py scale [--rounds 12] [--repeat 3] [--processes 2]
        # 100 a round of 100 clients against 100 a round of 10,000, every client holding 12 samples
        # (MNIST-1D at 1,500 and 150,000 samples: 80% train), so a round is the same work in both
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "fl_mnist1d.yaml"


def run(out: Path, rounds: int, processes: int, overrides: list[str]) -> dict:
    """One simulate command; its seconds per round and peak memory."""
    sets = [f"fl.rounds={rounds}", "fl.stop_at_target=false", f"fl.eval_every={rounds}", *overrides]
    command = [sys.executable, "-m", "shoal.cli", "fl", "simulate", str(CONFIG), "--processes", str(processes),
               "--out", str(out), *(arg for s in sets for arg in ("--set", s))]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    times = [json.loads(line)["time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    gaps = [b - a for a, b in zip(times[:-2], times[1:-1])]  # rounds 2 .. rounds-1
    return {"s_per_round": statistics.median(gaps), "peak_mb": summary["peak_memory_bytes"] / 2**20,
            "worker_peak_mb": (summary.get("worker_peak_memory_bytes") or 0) / 2**20}


def row(label: str, runs: list[dict]) -> None:
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"{label:<34} {median['s_per_round']:8.3f} s/round  peak {median['peak_mb']:7.1f} MB"
          f"  worker peak {median['worker_peak_mb']:7.1f} MB  ({len(runs)} runs: "
          + ", ".join(f"{r['s_per_round']:.3f}" for r in runs) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["processes", "scale"])
    parser.add_argument("--processes", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-fl-processes-"))
    if args.what == "processes":
        rounds = args.rounds or 30
        for processes in args.processes or [1, 2]:
            runs = [run(tmp / f"p{processes}-{k}", rounds, processes, []) for k in range(args.repeat)]
            row(f"--processes {processes}", runs)
        return
    rounds, processes = args.rounds or 12, (args.processes or [2])[0]
    for clients, samples in ((100, 1_500), (10_000, 150_000)):
        overrides = [f"data.dataset=mnist1d:samples={samples}", f"fl.clients={clients}", "fl.clients_per_round=100"]
        runs = [run(tmp / f"c{clients}-{k}", rounds, processes, overrides) for k in range(args.repeat)]
        row(f"{clients:,} clients, 100 a round", runs)


if __name__ == "__main__":
    main()
