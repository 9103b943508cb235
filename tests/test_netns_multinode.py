"""Multi-node training across emulated hosts (network namespaces on a bridge).

These need root and iproute2; elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shoal.netem import Testbed, check_available

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(check_available() is not None, reason=str(check_available())),
]

CONFIG = """\
seed: 0
data: {dataset: digits, batch_size: 16}
model: "mlp:hidden=[64]"
optimizer: {lr: 0.1}
schedule: {name: constant}
train: {steps: 60, eval_every: 30}
"""


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun passes it on to its workers, which
    run in their own sessions), then SIGKILL whatever is left of the group.
    Testbed.down() kills anything still inside the namespaces afterwards."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _run_on_hosts(tb: Testbed, argvs: list[list[str]], tmp_path: Path, timeout_s: float,
                  **popen_kw) -> tuple[list[int | None], str]:
    """Start ``argvs[i]`` on host i, wait for all (stopping early once one has
    failed: the survivor would otherwise sit in the launcher's exit barrier,
    300 s, waiting for the dead one); returns the exit codes and the logs."""
    procs, logs = [], []
    try:
        for i, argv in enumerate(argvs):
            log = open(tmp_path / f"host{i}.log", "w+")
            logs.append(log)
            procs.append(tb.popen(i, argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen_kw))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 10)
            time.sleep(0.5)
    finally:
        for p in procs:
            _kill_group(p)
        for log in logs:
            log.close()
    output = "\n".join(f"--- host {i} (exit {p.returncode}) ---\n{(tmp_path / f'host{i}.log').read_text()[-6000:]}"
                       for i, p in enumerate(procs))
    return [p.returncode for p in procs], output


def test_shaped_testbed_connects_and_cleans_up():
    with Testbed(2, rate="100mbit") as tb:
        run_id = tb.run_id
        assert tb.host_address(0) == "198.18.0.1" and tb.host_address(1) == "198.18.0.2"
        assert tb.namespace(0) in _namespaces() and tb.namespace(1) in _namespaces()
        assert "tbf" in tb.run(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        if tb.run(0, ["sh", "-c", "command -v ping"], check=False).returncode == 0:
            tb.run(0, ["ping", "-c", "1", "-W", "2", tb.host_address(1)], timeout=10)
        else:
            # No ping on this machine: a TCP connect from host 0 to a listener on host 1.
            listener = tb.popen(1, [sys.executable, "-c", (
                "import socket; s = socket.create_server((%r, 5001)); print('ready', flush=True);"
                " c, _ = s.accept(); c.sendall(b'pong'); c.close()") % tb.host_address(1)],
                stdout=subprocess.PIPE, text=True)
            try:
                assert listener.stdout.readline().strip() == "ready"
                reply = tb.run(0, [sys.executable, "-c", (
                    "import socket; s = socket.create_connection((%r, 5001), timeout=5);"
                    " print(s.recv(16).decode())") % tb.host_address(1)], timeout=20)
                assert reply.stdout.strip() == "pong"
                assert listener.wait(timeout=10) == 0
            finally:
                _kill_group(listener)
        # Only the testbed's own subnet is routable from a host.
        routes = tb.run(0, ["ip", "route"]).stdout
        assert "default" not in routes
    assert run_id not in _namespaces()


@pytest.mark.slow
def test_torchrun_two_namespace_hosts(tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    rdzv_id = f"shoal-test-{uuid.uuid4().hex[:8]}"
    with Testbed(2) as tb:
        argvs = [[
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={tb.host_address(0)}:29400", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=is_host={1 if i == 0 else 0}",
            "--local-addr", tb.host_address(i),
            "-m", "shoal.worker", str(config), "--out", str(out),
        ] for i in range(2)]
        codes, output = _run_on_hosts(tb, argvs, tmp_path, 240, env=dict(os.environ, GLOO_SOCKET_IFNAME="eth0"))
        assert codes == [0, 0], output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 4, output
    assert summary["final_accuracy"] > 0.5, summary
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert metrics and json.loads(metrics[0]), output


def test_netem_cli_up_holds_the_testbed_until_interrupted(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "netem", "up", "--hosts", "3", "--rate", "1gbit,1gbit,100mbit"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        text = "".join(lines)
        run_id = re.search(r"shoal testbed ([0-9a-f]{6})", text).group(1)
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(f"shoal-{run_id}-{i}" in namespaces for i in range(3))
        assert "198.18.0.3" in text and "100mbit" in text
        qdisc = subprocess.run(["ip", "netns", "exec", f"shoal-{run_id}-2", "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert run_id not in namespaces


def test_netem_cli_down_clears_a_leftover_testbed():
    # (Not "--all" here: that would also take down testbeds of runs beside this one.)
    leftover = Testbed(2).up()  # never taken down: as if its owner had crashed
    result = subprocess.run([sys.executable, "-m", "shoal.cli", "netem", "down", leftover.run_id],
                            capture_output=True, text=True)
    assert result.returncode == 0 and f"testbed {leftover.run_id} removed" in result.stdout
    assert leftover.run_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_netem_cli_rejects_bad_input():
    bad_rate = subprocess.run([sys.executable, "-m", "shoal.cli", "netem", "up", "--rate", "fast"],
                              capture_output=True, text=True)
    bad_id = subprocess.run([sys.executable, "-m", "shoal.cli", "netem", "down", "zz"], capture_output=True, text=True)
    assert bad_rate.returncode == 2 and "rate 'fast'" in bad_rate.stderr
    assert bad_id.returncode == 2 and "6 hex digits" in bad_id.stderr


@pytest.mark.slow
def test_a_rank_killed_on_one_host_restarts_the_whole_job_once(tmp_path: Path):
    """SIGKILL rank 1 (host 0) mid-run: both hosts' groups restart, agree on the
    attempt, resume from the last checkpoint, and count one restart for the job."""
    import yaml

    from tests.conftest import ROOT, small_config

    cfg = small_config(tmp_path / "out", model="failing_entry:make_model_that_dies_once:die_at=50",
                       train__steps=80, train__eval_every=40)
    cfg["train"]["checkpoint_every"] = 20
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rdzv_id = f"shoal-test-{uuid.uuid4().hex[:8]}"
    with Testbed(2) as tb:
        argvs = [[sys.executable, "-m", "shoal.cli", "train", str(config), "--workers", "2", "--nnodes", "2",
                  "--rdzv-endpoint", f"{tb.host_address(0)}:29400", "--rdzv-id", rdzv_id,
                  "--is-host" if i == 0 else "--not-host", "--local-addr", tb.host_address(i),
                  "--max-restarts", "1"] for i in range(2)]
        codes, output = _run_on_hosts(tb, argvs, tmp_path, 300, cwd=ROOT / "tests")
        assert codes == [0, 0], output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == 40 and summary["steps"] == 80, summary
    assert summary["workers"] == 4
