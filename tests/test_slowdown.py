"""--slowdown: one worker's compute made FACTOR times slower, by CPU quota or busy-waiting."""

from __future__ import annotations

import json
import statistics

import pytest

import shoal
from shoal.launch import JobFailed
from shoal.netem import slowdown as slowdown_module
from tests.conftest import run_cli, small_config


def _mean_step(out) -> float:
    # The mean, not the median: a CPU quota throttles in 10 ms periods, so with
    # steps of a millisecond or two most run at full speed and a few wait long.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(m["compute_s"] for m in lines[5:])  # past the first, warming steps


@pytest.mark.parametrize("method", ["cgroup", "busy"])
def test_the_slowed_worker_computes_factor_times_slower(tmp_path, method):
    if method == "cgroup" and slowdown_module._cpu_hierarchy() is None:
        pytest.skip("no writable cgroup cpu controller here")
    # Local SGD that never averages: rank 0's step time is its own compute alone.
    base = dict(workers=2, strategy="localsgd:period=100000", model="mlp:hidden=[256,256]", data__batch_size=64,
                train__steps=100, train__eval_every=100)
    shoal.train(small_config(tmp_path / "fast", **base))
    shoal.train(small_config(tmp_path / "slow", slowdown={"factors": {0: 3.0}, "method": method}, **base))
    ratio = _mean_step(tmp_path / "slow") / _mean_step(tmp_path / "fast")
    # A quota also charges the worker's own background threads (gloo, the
    # allocator) and throttles in whole periods, so on a loaded machine it
    # overshoots: 5.7x was seen once in a full suite run. Busy-waiting scales
    # the measured compute itself and stays close to the factor.
    high = 6.5 if method == "cgroup" else 4.5
    assert 2.0 < ratio < high, f"{method}: slowed steps {ratio:.2f}x the normal ones, wanted ~3x"
    assert not list(slowdown_module.CGROUP_ROOT.glob("cpu/shoal-slow-*")), "cgroup left behind"


def test_a_rank_outside_the_job_is_refused(tmp_path):
    with pytest.raises(JobFailed, match="rank 5 does not exist in a job of 2 workers"):
        shoal.train(small_config(tmp_path / "run", slowdown={"factors": {5: 2.0}}))


@pytest.mark.parametrize("flag,message", [
    ("1:0.5", "factor 0.5 must be in [1, 100]"),
    ("one:2", "expected RANK:FACTOR"),
    ("1:fast", "FACTOR must be a number"),
])
def test_bad_slowdown_flags_exit_2(tmp_path, flag, message):
    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 2}\n")
    result = run_cli("train", str(config), "--slowdown", flag)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_stale_cgroups_of_killed_workers_are_removed():
    found = slowdown_module._cpu_hierarchy()
    if found is None:
        pytest.skip("no writable cgroup cpu controller here")
    stale = found[0] / "shoal-slow-999999999"
    stale.mkdir()
    slowdown_module.remove_stale_cgroups()
    assert not stale.exists()
