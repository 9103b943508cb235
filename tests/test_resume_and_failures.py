"""Killing a run and resuming it gives the unbroken result; worker errors are reported by rank."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import shoal
from shoal.launch import JobFailed
from shoal.metrics.writer import read_metrics
from shoal.engine.checkpoint import CorruptCheckpoint, load_checkpoint, save_checkpoint
from tests.conftest import ROOT, invoke_cli, run_cli, small_config

STEPS = 500


def resume_config(out):
    cfg = small_config(out, model="mlp:hidden=[256, 256]", train__steps=STEPS, train__eval_every=100)
    cfg["train"]["checkpoint_every"] = 40
    cfg["schedule"] = {"name": "cosine", "warmup_steps": 20}  # scheduler state must survive too
    return cfg


@pytest.mark.processes
def test_killed_run_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path):
    unbroken = shoal.train(resume_config(tmp_path / "unbroken"))

    broken_dir = tmp_path / "broken"
    cfg_path = tmp_path / "broken.yaml"
    cfg_path.write_text(yaml.safe_dump(resume_config(broken_dir)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "train", str(cfg_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    checkpoint = broken_dir / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker, mid-run
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the deadline"
    assert not (broken_dir / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = load_checkpoint(checkpoint)["run"]["step"]
    assert 0 < killed_at < STEPS

    result = invoke_cli("train", "--resume", str(broken_dir))
    assert result.returncode == 0, result.stderr

    resumed = load_checkpoint(checkpoint)
    expected = load_checkpoint(tmp_path / "unbroken" / "checkpoint.pt")
    assert resumed["run"]["step"] == STEPS and resumed["run"]["resumed_from"] == killed_at
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, msg=name)
    summary = shoal.Summary.model_validate_json((broken_dir / "summary.json").read_text())
    assert summary.final_accuracy == pytest.approx(unbroken.final_accuracy)
    assert summary.resumed_from_step == killed_at
    # metrics.jsonl reads as one run: every step once, in order.
    assert [r["step"] for r in read_metrics(broken_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_checkpoint_is_atomic_and_checksummed(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)})
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpoint, match="not a shoal checkpoint"):
        load_checkpoint(path)


def train_from_tests(tmp_path, cfg: dict, *args: str, cli=run_cli):
    """`shoal train` on ``cfg`` from tests/, where the failing_entry module lives; ``cli``:
    :func:`run_cli` (a fresh interpreter, whose stderr has its workers' lines too) or :func:`invoke_cli`."""
    path = tmp_path / f"{Path(cfg['out']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cli("train", str(path), *args, cwd=ROOT / "tests")


@pytest.mark.processes
def test_a_failing_rank_is_reported_with_its_error(tmp_path):
    cfg = small_config(tmp_path / "out", model="failing_entry:make_model")
    result = train_from_tests(tmp_path, cfg, cli=invoke_cli)
    assert result.returncode == 1
    assert "rank 1 failed" in result.stderr
    assert "injected failure on rank 1" in result.stderr


@pytest.mark.processes
def test_launcher_restart_resumes_from_the_last_checkpoint(tmp_path):
    """A rank SIGKILLed mid-run: with --max-restarts the group restarts and resumes, same result."""
    def config(out, model):
        cfg = small_config(out, model=model, train__steps=80, train__eval_every=40)
        cfg["train"]["checkpoint_every"] = 20
        return cfg

    assert train_from_tests(tmp_path, config(tmp_path / "ref", "failing_entry:make_plain_model"),
                            cli=invoke_cli).returncode == 0
    faulty = config(tmp_path / "faulty", "failing_entry:make_model_that_dies_once:die_at=50")
    result = train_from_tests(tmp_path, faulty, "--max-restarts", "1", cli=invoke_cli)
    assert result.returncode == 0, result.stderr

    summary = shoal.Summary.model_validate_json((tmp_path / "faulty" / "summary.json").read_text())
    assert summary.restarts == 1 and summary.resumed_from_step == 40 and summary.steps == 80
    expected = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"]
    got = load_checkpoint(tmp_path / "faulty" / "checkpoint.pt")["model"]
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)


@pytest.mark.processes
def test_without_restarts_a_killed_rank_fails_the_job(tmp_path):
    cfg = small_config(tmp_path / "out", model="failing_entry:make_model_that_dies_once:die_at=5")
    result = train_from_tests(tmp_path, cfg, cli=invoke_cli)
    assert result.returncode == 1
    assert "rank 1 failed (exit code -9): killed by signal SIGKILL" in result.stderr


def test_a_rank_that_lost_a_peer_is_told_from_one_that_failed_itself():
    from shoal.worker import lost_a_peer

    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:40123: "
            "Connection reset by peer")
    assert lost_a_peer(RuntimeError(gloo)) and lost_a_peer(RuntimeError("Connection closed by peer"))
    assert not lost_a_peer(ValueError("model 'x': unknown")) and not lost_a_peer(RuntimeError("CUDA out of memory"))


@pytest.mark.processes
def test_workers_see_the_launchers_environment_and_directory_at_each_launch(tmp_path, monkeypatch):
    # Workers are forked from a server started at the first launch: what changed
    # in the launcher since (a variable, the directory) must reach them all the same.
    shoal.train(small_config(tmp_path / "first", workers=1, train__steps=2))
    monkeypatch.setenv("SHOAL_TEST_MARK", "set-later")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobFailed, match=f"mark=set-later cwd={tmp_path}"):
        shoal.train(small_config(tmp_path / "second", model="tests.failing_entry:make_model_that_reports_its_environment"))


def test_restart_budget_counts_the_whole_job(monkeypatch):
    from shoal.worker import check_restart_budget

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    check_restart_budget(0)
    check_restart_budget(1)
    with pytest.raises(RuntimeError, match="restart budget spent: this would be restart 2 of the job"):
        check_restart_budget(2)


@pytest.mark.processes
def test_kill_flag_injects_a_crash_that_a_restart_recovers(tmp_path):
    cfg = small_config(tmp_path / "out", train__steps=60, train__eval_every=30)
    cfg["train"]["checkpoint_every"] = 20
    result = train_from_tests(tmp_path, cfg, "--kill", "1:30", "--max-restarts", "1", cli=invoke_cli)
    assert result.returncode == 0, result.stderr
    summary = shoal.Summary.model_validate_json((tmp_path / "out" / "summary.json").read_text())
    assert summary.restarts == 1 and summary.resumed_from_step == 20 and summary.steps == 60
    assert 0 < summary.restart_s < 250  # from the SIGKILL to the resumed first step (its cost: BENCHMARKS.md)


@pytest.mark.parametrize("flag", ["1", "a:3", "1:x"])
def test_bad_kill_flag_exits_2(tmp_path, flag):
    result = train_from_tests(tmp_path, small_config(tmp_path / "out"), "--kill", flag, cli=invoke_cli)
    assert result.returncode == 2 and "expected RANK:STEP" in result.stderr
