"""The first process of every job the service starts: ``python -m shoal.platform.shim DIR ATTEMPT [CGROUP ...] -- ARGV``.

1. It moves itself into the job's cgroups, so that everything the job starts is held by them.
2. It writes ``DIR/shim.json`` (its pid, its start time, the attempt), by which a restarted service
   finds the job again and knows the pid is still this job's, not a reused number.
3. It runs ARGV, its output appended to ``DIR/log``, and waits; SIGTERM and SIGINT it leaves to
   the job (the service signals the whole process group: a ``shoal train`` job then checkpoints
   and exits by itself).
4. It writes ``DIR/exit.json`` (the attempt and the exit status) atomically, then kills what is left of
   the job's process group, itself last.

It runs in its own session, so the service can die and come back without the job noticing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from shoal.platform.node import join

SHIM, EXIT, LOG = "shim.json", "exit.json", "log"


def proc_start(pid: int) -> int | None:
    """The kernel's start time of process ``pid`` (clock ticks after boot), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(args: list[str]) -> int:
    if "--" not in args or len(args) < 3:
        print("usage: python -m shoal.platform.shim DIR ATTEMPT [CGROUP ...] -- ARGV", file=sys.stderr)
        return 2
    split = args.index("--")
    job_dir, attempt, cgroups, argv = Path(args[0]), int(args[1]), args[2:split], args[split + 1:]
    join(cgroups)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    write_atomic(job_dir / SHIM, {"pid": os.getpid(), "start": proc_start(os.getpid()), "attempt": attempt})
    with open(job_dir / LOG, "ab", buffering=0) as log:
        try:
            # The job gets the default dispositions back; only this waiting process ignores the signals.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=os.environ.get("SHOAL_JOB_CWD") or job_dir,
                                     preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                                         for s in (signal.SIGTERM, signal.SIGINT)])
        except OSError as err:
            log.write(f"shoal: cannot start {argv[0]!r}: {err}\n".encode())
            write_atomic(job_dir / EXIT, {"attempt": attempt, "returncode": 127, "error": str(err)})
            return 127
        returncode = child.wait()
    write_atomic(job_dir / EXIT, {"attempt": attempt, "returncode": returncode})
    # Whatever the job left behind in its process group (a command's background children) ends with it,
    # so its CPUs are free when the service hands them on; this process goes with them.
    os.killpg(os.getpgrp(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
