"""SIGINT (Ctrl-C) and SIGTERM (preemption) stop a run at a step boundary, checkpointed and resumable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, small_config
from shoal.engine.stop import POLL_EVERY, GracefulStop


class FakeStore:
    """compare_set as torch.distributed.Store has it: set when absent, return what is stored."""

    def __init__(self):
        self.values = {}

    def compare_set(self, key, expected, desired):
        if key not in self.values and expected == "":
            self.values[key] = desired.encode()
        return self.values[key]

    def check(self, keys):
        return all(key in self.values for key in keys)

    def get(self, key):
        return self.values[key]


def test_the_first_proposal_wins_and_every_worker_reads_it():
    store = FakeStore()
    first, second = GracefulStop(store), GracefulStop(store)
    assert first.stop_after(10, margin=2) is None  # no signal: train on, nothing asked of the store
    assert store.values == {}
    first._note(signal.SIGINT, None)
    second._note(signal.SIGINT, None)
    # margin + POLL_EVERY ahead: room for a worker without a signal of its own to look (below)
    assert first.stop_after(10, margin=2) == 10 + 2 + POLL_EVERY
    assert second.stop_after(11, margin=2) == 16  # a step behind or ahead, the same boundary
    assert first.stop_after(11, margin=2) == 16  # decided once


def test_a_worker_without_a_signal_finds_the_proposal_before_the_agreed_step():
    store = FakeStore()
    signalled, unsignalled = GracefulStop(store), GracefulStop(store)
    signalled._note(signal.SIGTERM, None)
    after = signalled.stop_after(9, margin=2)
    # One step ahead of the proposer (workers in step are at most the margin apart): it looks every
    # POLL_EVERY steps and has the agreed step before it gets there.
    found = next(step for step in range(10, after + 1) if unsignalled.stop_after(step, margin=2) is not None)
    assert found <= after and unsignalled.after == after and unsignalled.signal is None


def test_repeated_signals_keep_the_first_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    relayed = []
    with GracefulStop() as stop:
        stop.relay = relayed.append
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # e.g. the agent passing on the terminal's Ctrl-C
        time.sleep(0.05)
        assert stop.signal == signal.SIGTERM and relayed == [signal.SIGTERM]
        assert stop.stop_after(7, margin=2) == 7  # alone (no store): at once
    assert signal.getsignal(signal.SIGTERM) is before


def _start(tmp_path: Path, name: str, **changes) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / name
    cfg = small_config(out, train__steps=100_000, train__eval_every=500, train__log_every=10, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "train", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:  # training, not starting up
            return proc, out
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the run did not start training: {proc.communicate()[1][-2000:]}")


def _saved_step(out: Path) -> int:
    from shoal.engine.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoint.pt")["run"]["step"]


@pytest.mark.processes
def test_ctrl_c_stops_with_one_line_a_checkpoint_and_a_resume_that_goes_on(tmp_path):
    proc, out = _start(tmp_path, "sigint")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    # The workers exit by themselves: not SIGKILLed at the end of the agent's 30 s shutdown timeout.
    assert time.monotonic() - sent < 25
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["signal"] == "SIGINT" and f"at step {stopped['step']}," in lines[0]
    assert f"shoal train --resume {out}" in lines[0]
    assert _saved_step(out) == stopped["step"] > 0
    assert not (out / "summary.json").exists()  # stopped, not finished

    resumed = run_cli("train", "--resume", str(out), "--set", f"train.steps={stopped['step'] + 20}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped["step"] and summary["steps"] == stopped["step"] + 20
    assert not (out / "stopped.json").exists()


@pytest.mark.processes
@pytest.mark.parametrize("strategy", ["localsgd:period=4", "async_ps"])
def test_sigterm_stops_other_strategies_at_a_checkpoint_with_exit_143(tmp_path, strategy):
    proc, out = _start(tmp_path, "sigterm", strategy=strategy)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["signal"] == "SIGTERM" and _saved_step(out) == stopped["step"] > 0
    assert "resume with" in stderr and "Traceback" not in stderr
