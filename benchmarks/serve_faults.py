"""kill -9 of ``shoal serve`` while it runs a replay of short real jobs: nothing lost, nothing run twice.

    python benchmarks/serve_faults.py [--jobs 200] [--kills 10]

1. Start ``shoal serve`` (FIFO, 4 CPU slots) and submit ``--jobs`` jobs, each a Python process that
   appends ``start`` to its own file, computes a checksum of its id for 0.2-1.0 s, then appends the
   result and ``end``; the submits go on while the service is being killed (the client retries
   with its submit key).
2. Every few seconds SIGKILL the service and start it again, ``--kills`` times.
3. At the end: every job is ``done``; the service holds exactly ``--jobs`` jobs; each file reads
   ``start``, the right result, ``end``: run once, whole.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from shoal.platform.client import Client

JOB = ("import hashlib, sys, time\n"
       "out, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])\n"
       "open(out, 'a').write('start\\n')\n"
       "end = time.time() + seconds\n"
       "h = str(n).encode()\n"
       "while time.time() < end:\n"
       "    time.sleep(0.01)\n"
       "h = hashlib.sha256(h).hexdigest()\n"
       "open(out, 'a').write(h + '\\nend\\n')\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--port", type=int, default=8477)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-serve-faults-"))
    state, outputs = tmp / "state", tmp / "out"
    outputs.mkdir()
    script = tmp / "job.py"
    script.write_text(JOB)

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "shoal.cli", "serve", "--state", str(state), "--port",
                                 str(args.port), "--cpus", "4", "--gpus", "0", "--memory-mb", "8192",
                                 "--no-cgroups", "--policy", "fifo"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    server = start()
    client = Client(f"http://127.0.0.1:{args.port}", None, retry_s=120)
    while not (state / "admin.token").is_file():
        time.sleep(0.1)
    client.token = (state / "admin.token").read_text().strip()
    ids: list[int] = []

    def submit_all() -> None:
        for i in range(args.jobs):
            seconds = 0.2 + 0.8 * ((i * 7919) % 100) / 100
            ids.append(client.submit({"kind": "command", "name": f"replay-{i}", "workers": 1,
                                      "command": [sys.executable, str(script), str(outputs / str(i)), str(i),
                                                  str(seconds)]})["id"])

    submitter = threading.Thread(target=submit_all)
    began = time.monotonic()
    submitter.start()
    for _ in range(args.kills):
        time.sleep(3.0)
        server.kill()
        server.wait()
        server = start()
    submitter.join()
    try:
        rows = [client.wait(job, timeout_s=600) for job in ids]
        everyone = client.list(everyone=True, limit=10_000)
    finally:
        server.terminate()
        server.wait()
    import hashlib

    intact = 0
    for i in range(args.jobs):
        text = (outputs / str(i)).read_text() if (outputs / str(i)).exists() else ""
        if text == f"start\n{hashlib.sha256(str(i).encode()).hexdigest()}\nend\n":
            intact += 1
    report = {"jobs": args.jobs, "kills": args.kills, "seconds": round(time.monotonic() - began, 1),
              "done": sum(r["state"] == "done" for r in rows), "held_by_the_service": len(everyone),
              "ran_once_and_whole": intact, "lost": args.jobs - len({r["id"] for r in rows}),
              "restarted_after_a_kill": sum(r["attempt"] > 1 for r in rows)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
