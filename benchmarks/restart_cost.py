"""What a worker failure costs a synchronous run: kill one, let the launcher restart.

For each repetition, two runs of the same job through the CLI:

1. unbroken: ``shoal train CONFIG``
2. killed: the same with ``--kill RANK:STEP --max-restarts 1``: the worker is
   SIGKILLed after STEP, the launcher restarts the group, the run resumes from
   its last checkpoint (``train.checkpoint_every``)

and reports, as medians:

- overhead = killed command's wall time - unbroken command's wall time
- lost steps = STEP - the last checkpoint before it, and their time at the
  unbroken run's median step
- restart time = from the kill to the resumed group's first step (the
  summary's ``restart_s``: the agent noticing, re-rendezvous, new processes,
  imports, rebuilding, reading the checkpoint)

The claim to check: overhead <= lost steps' time + restart time.

    .venv/bin/python benchmarks/restart_cost.py --workers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, out: Path, workers: int, extra: list[str]) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "shoal.cli", "train", str(config), "--workers", str(workers), "--out", str(out),
            *extra]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "summary.json").read_text())


def median_step(out: Path) -> float:
    times = [json.loads(line)["time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "mnist1d.yaml"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--kill", default="1:350", help="RANK:STEP")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    kill_step = int(args.kill.split(":")[1])
    lost_steps = kill_step - (kill_step // args.checkpoint_every) * args.checkpoint_every
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg.setdefault("train", {}).update(steps=args.steps, checkpoint_every=args.checkpoint_every,
                                       stop_at_target=False, eval_every=args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(yaml.safe_dump(cfg))
        for k in range(args.repeats):
            base_wall, _ = run(config, Path(tmp) / f"unbroken{k}", args.workers, [])
            step_s = median_step(Path(tmp) / f"unbroken{k}")
            killed_wall, summary = run(config, Path(tmp) / f"killed{k}", args.workers,
                                       ["--kill", args.kill, "--max-restarts", "1"])
            assert summary["restarts"] == 1 and summary["steps"] == args.steps, summary
            row = {
                "unbroken_s": base_wall,
                "killed_s": killed_wall,
                "overhead_s": killed_wall - base_wall,
                "lost_steps": lost_steps,
                "lost_steps_s": lost_steps * step_s,
                "restart_s": summary["restart_s"],
            }
            row["bound_s"] = row["lost_steps_s"] + row["restart_s"]
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print("medians:", json.dumps({k: round(v, 2) for k, v in medians.items()}))
    verdict = "holds" if medians["overhead_s"] <= medians["bound_s"] else "does NOT hold"
    print(f"overhead {medians['overhead_s']:.1f} s <= lost steps {medians['lost_steps_s']:.1f} s "
          f"+ restart {medians['restart_s']:.1f} s = {medians['bound_s']:.1f} s: {verdict}")


if __name__ == "__main__":
    main()
