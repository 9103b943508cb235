"""What a job's start costs when one process runs several: workers forked from
the preloaded fork server (shoal's default) against workers spawned afresh.

Runs ``--jobs`` identical 2-worker jobs of 2 steps each in this process, one
after another, for each start method, and prints each job's wall time from
``shoal.train`` called to returned; the first job of the fork server includes
starting the server (its one import of torch and shoal's worker).

    python benchmarks/job_startup.py [--jobs 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import shoal
import shoal.launch
import shoal.preload


def _config(out: Path, workers: int) -> dict:
    return {"seed": 0, "workers": workers, "model": "mlp:hidden=[32]", "data": {"dataset": "digits", "batch_size": 16},
            "train": {"steps": 2, "eval_every": 2}, "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-startup-"))
    for method in ("spawn", "forkserver"):
        shoal.launch.START_METHOD = shoal.preload.START_METHOD = method  # read at each launch
        times = []
        for k in range(args.jobs):
            started = time.perf_counter()
            shoal.train(_config(tmp / f"{method}{k}", args.workers))
            times.append(time.perf_counter() - started)
        later = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        print(f"{method:10s} first job {times[0]:.2f} s, later jobs {later:.2f} s median "
              f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
