"""How close ``--slowdown RANK:FACTOR`` comes to FACTOR, on an idle or a loaded machine.

Trains the same small job twice per repetition, once at full speed and once
with rank 0 slowed FACTOR times, on 2 workers under local SGD that never
averages (rank 0's step is its own compute alone), and prints the ratio of
rank 0's mean step compute, slowed over full speed, per repetition and as the
median; and, within the slowed run, its mean step compute over its own (the
step less the time spun, from ``slowdown_s`` in metrics.jsonl; busy-waiting
only). ``--hogs N`` runs N busy processes beside the job, as a loaded machine.

    python benchmarks/slowdown_fidelity.py [--factor 3] [--method busy|cgroup] [--repeat 3] [--hogs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
from pathlib import Path

import shoal


def _hog() -> None:
    while True:
        pass


def _config(out: Path, slowdown: dict | None) -> dict:
    return {
        "seed": 0, "workers": 2, "strategy": "localsgd:period=100000", "model": "mlp:hidden=[256,256]",
        "data": {"dataset": "digits", "batch_size": 64}, "optimizer": {"name": "sgd", "lr": 0.1},
        "train": {"steps": 100, "eval_every": 100}, "out": str(out),
        **({"slowdown": slowdown} if slowdown else {}),
    }


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][5:]  # past the warm-up


def _mean_compute(out: Path) -> float:
    return statistics.mean(m["compute_s"] for m in _steps(out))


def _in_run(out: Path) -> float | None:
    steps = _steps(out)
    if not all("slowdown_s" in m for m in steps):
        return None
    return _mean_compute(out) / statistics.mean(m["compute_s"] - m["slowdown_s"] for m in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--method", choices=["busy", "cgroup"], default="busy")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes beside the job")
    args = parser.parse_args()
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    try:
        tmp, ratios, in_run = Path(tempfile.mkdtemp(prefix="shoal-slowdown-")), [], []
        for k in range(args.repeat):
            shoal.train(_config(tmp / f"fast{k}", None))
            shoal.train(_config(tmp / f"slow{k}", {"factors": {0: args.factor}, "method": args.method}))
            ratios.append(_mean_compute(tmp / f"slow{k}") / _mean_compute(tmp / f"fast{k}"))
            in_run.append(_in_run(tmp / f"slow{k}"))
    finally:
        for hog in hogs:
            hog.terminate()
    print(f"{args.method} {args.factor:g}x with {args.hogs} busy processes: slowed/full-speed compute "
          f"{statistics.median(ratios):.2f}x median ({', '.join(f'{r:.2f}' for r in ratios)})")
    if None not in in_run:
        print(f"  within the slowed run, step compute over own compute: {statistics.median(in_run):.2f}x median "
              f"({', '.join(f'{r:.2f}' for r in in_run)})")


if __name__ == "__main__":
    main()
