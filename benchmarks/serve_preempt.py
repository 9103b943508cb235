"""What a preemption and a resize cost a real ``shoal train`` job under ``shoal serve``.

    python benchmarks/serve_preempt.py [--repeat 3]

A 2-worker training job (an MLP on scikit-learn's digits, elastic 1..2 workers, logging every
step) runs under the ``priority`` policy on 2 CPUs. Once it has trained 100 steps:

1. A priority-1 command that needs both CPUs arrives: the job is preempted (SIGTERM, a checkpoint
   at its next step boundary), the command runs, the job resumes from its checkpoint. The overhead
   is the time from the preemption to the job's next logged step, less the command's own run.
2. Once it trains again, ``resize`` to 1 worker: the overhead is from the request to the first
   step at the new size.

Each row also checks that no step was lost or repeated: the steps logged are strictly increasing
and the last one is ``train.steps``. Medians over ``--repeat`` jobs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from shoal.platform.client import Client
from shoal.platform.node import discover
from shoal.platform.service import build

CONFIG = {"seed": 0, "model": "mlp", "data": {"dataset": "digits", "batch_size": 16},
          "optimizer": {"name": "sgd", "lr": 0.05},
          "train": {"steps": 3000, "eval_every": 1000, "checkpoint_every": 100_000, "log_every": 1}}


def steps(run: Path) -> list[int]:
    """The steps logged so far."""
    path = run / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return out


def wait_for_step_after(run: Path, step: int, timeout_s: float = 300) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = steps(run)
        if seen and seen[-1] > step:
            return time.time()
        time.sleep(0.02)
    raise TimeoutError(f"no step after {step} in {run}")


def one(tmp: Path) -> dict:
    svc = build(tmp, policy="priority", node=discover(2, 8192, 0), cgroups=False, tick_s=0.1)
    server = uvicorn.Server(uvicorn.Config(svc.app(), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    svc.agent.start()
    client = Client(f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}",
                    (svc.state / "admin.token").read_text().strip())
    try:
        job = client.submit({"kind": "train", "config": CONFIG, "min_workers": 1, "max_workers": 2})["id"]
        run = svc.agent.job_dir(job) / "run"
        wait_for_step_after(run, 100)
        asked = time.time()
        high = client.submit({"kind": "command", "command": ["true"], "workers": 2, "priority": 1})["id"]
        client.wait(high, poll_s=0.05)
        ran = client.show(high)
        stopped = json.loads((run / "stopped.json").read_text())["step"] if (run / "stopped.json").exists() \
            else steps(run)[-1]
        resumed = wait_for_step_after(run, stopped)
        preempt = resumed - asked - (ran["finished"] - ran["first_start"])
        before = steps(run)[-1]
        asked = time.time()
        client.resize(job, 1)
        _wait(lambda: client.show(job)["attempt"] == 3)
        resized = wait_for_step_after(run, max(before, steps(run)[-1]))
        final = client.wait(job, timeout_s=600)
        logged = steps(run)
        intact = final["state"] == "done" and logged == sorted(set(logged)) and logged[-1] == CONFIG["train"]["steps"]
        return {"preempt_overhead_s": preempt, "resize_overhead_s": resized - asked, "steps_intact": intact}
    finally:
        server.should_exit = True
        svc.agent.close()


def _wait(condition, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [one(Path(tempfile.mkdtemp(prefix="shoal-serve-preempt-"))) for _ in range(args.repeat)]
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    print(json.dumps({"median_preempt_overhead_s": round(statistics.median(r["preempt_overhead_s"] for r in rows), 2),
                      "median_resize_overhead_s": round(statistics.median(r["resize_overhead_s"] for r in rows), 2),
                      "all_intact": all(r["steps_intact"] for r in rows)}))


if __name__ == "__main__":
    main()
