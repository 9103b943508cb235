"""--slowdown: one worker's compute made FACTOR times slower, by CPU quota or busy-waiting."""

from __future__ import annotations

import json
import os
import re
import statistics

import pytest

import shoal
from shoal.launch import JobFailed
from shoal.netem import slowdown as slowdown_module
from shoal.netem.slowdown import BusyWaitSchedule
from tests.conftest import invoke_cli, small_config


FACTOR = 3.0
# Local SGD that never averages: rank 0's step time is its own compute alone.
WORKLOAD = dict(workers=2, strategy="localsgd:period=100000", model="mlp:hidden=[512,512]", data__batch_size=128,
                train__steps=100, train__eval_every=100)


def _step(schedule: BusyWaitSchedule, own_s: float, late_s: float = 0.0) -> tuple[float, float]:
    """One simulated step: spin the wait asked for (plus ``late_s`` past it), then compute ``own_s``."""
    wait = schedule.next_wait()
    spun = wait + late_s
    return wait, schedule.record(own_s + spun, spun)


def test_the_busy_wait_follows_the_median_of_the_workers_own_compute():
    schedule = BusyWaitSchedule(3.0, window=3)
    assert schedule.next_wait() == 0.0  # nothing measured yet
    assert _step(schedule, 0.010) == (0.0, 0.010)
    assert _step(schedule, 0.010) == (pytest.approx(0.020), pytest.approx(0.010))
    _step(schedule, 0.100)  # one step stretched 10x by the scheduler ...
    assert schedule.next_wait() == pytest.approx(0.020)  # ... does not make the next wait jump
    _step(schedule, 0.012)
    _step(schedule, 0.012)
    assert schedule.next_wait() == pytest.approx(0.024)  # the window's median moved on


def test_an_overshot_spin_is_not_own_compute():
    schedule = BusyWaitSchedule(3.0)
    _step(schedule, 0.010)
    wait, own = _step(schedule, 0.010, late_s=0.005)  # descheduled 5 ms past its 20 ms wait
    assert wait == pytest.approx(0.020) and own == pytest.approx(0.010)
    assert schedule.next_wait() == pytest.approx(0.020)


def test_spins_that_overshoot_do_not_feed_the_next_waits():
    # Every spin overshoots by half its wait. The old rule (the last step's compute
    # less the wait asked for) added each overshoot, (FACTOR - 1) times over, to the
    # next wait: 1 ms more at every step here, without end.
    schedule = BusyWaitSchedule(FACTOR)
    waits = [_step(schedule, 0.001, late_s=0.5 * schedule.next_wait())[0] for _ in range(50)]
    assert waits[1:] == pytest.approx([(FACTOR - 1) * 0.001] * 49)


@pytest.mark.processes
def test_the_busy_slowed_worker_spins_as_scheduled(tmp_path):
    shoal.train(small_config(tmp_path / "slow", slowdown={"factors": {0: FACTOR}, "method": "busy"}, **WORKLOAD))
    lines = [json.loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    # Replay the schedule from what the worker logged: each step spun at least the
    # wait the schedule asked for, given the steps before it.
    schedule, waits = BusyWaitSchedule(FACTOR), 0.0
    for m in lines:
        wait = schedule.next_wait()
        assert m["slowdown_s"] >= wait, f"step {m['step']} spun {m['slowdown_s']:.6f} s of a {wait:.6f} s wait"
        waits += wait
        schedule.record(m["compute_s"], m["slowdown_s"])
    assert waits > 0
    # Within the run, a step's compute over its own: ~FACTOR (2.96x idle, 3.23x with two busy
    # processes beside it: BENCHMARKS.md). Against another run at full speed the ratio of
    # millisecond steps ranged 2.0x-8.5x on one machine, so no test compares runs.
    steps = lines[5:]  # past the first, warming steps
    ratio = statistics.mean(m["compute_s"] for m in steps) / statistics.mean(
        m["compute_s"] - m["slowdown_s"] for m in steps)
    assert 2.0 < ratio < 4.5, f"busy: slowed steps {ratio:.2f}x their own compute, wanted ~{FACTOR:g}x"


@pytest.mark.processes
def test_the_quota_slowed_worker_is_throttled_by_the_kernel(tmp_path, capfd):
    if slowdown_module._cpu_hierarchy() is None:
        pytest.skip("no writable cgroup cpu controller here")
    shoal.train(small_config(tmp_path / "slow", slowdown={"factors": {0: FACTOR}, "method": "cgroup"}, **WORKLOAD))
    err = capfd.readouterr().err
    # What the code decides: the quota (the worker's fair share of the cores, / FACTOR) ...
    cores = os.cpu_count() or 1
    share = min(max(1, cores // 2), cores / 2) / FACTOR
    assert f"rank 0: {FACTOR:g}x slower by a CPU quota of {share:.3f} cores" in err, err
    # ... and what the kernel did with it: it throttled the worker. (How much slower that
    # makes it depends on what else runs: BENCHMARKS.md measures it.)
    match = re.search(r"rank 0: throttled in (\d+) of (\d+) CPU periods", err)
    assert match and int(match[1]) > 0, err
    assert not list(slowdown_module.CGROUP_ROOT.glob("cpu/shoal-slow-*")), "cgroup left behind"


@pytest.mark.processes
def test_a_rank_outside_the_job_is_refused(tmp_path):
    with pytest.raises(JobFailed, match="rank 5 does not exist in a job of 2 workers"):
        shoal.train(small_config(tmp_path / "run", slowdown={"factors": {5: 2.0}}))


@pytest.mark.processes
@pytest.mark.parametrize("flag,message", [
    ("1:0.5", "factor 0.5 must be in [1, 100]"),
    ("one:2", "expected RANK:FACTOR"),
    ("1:fast", "FACTOR must be a number"),
])
def test_bad_slowdown_flags_exit_2(tmp_path, flag, message):
    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 2}\n")
    result = invoke_cli("train", str(config), "--slowdown", flag)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_stale_cgroups_of_killed_workers_are_removed():
    found = slowdown_module._cpu_hierarchy()
    if found is None:
        pytest.skip("no writable cgroup cpu controller here")
    stale = found[0] / "shoal-slow-999999999"
    stale.mkdir()
    slowdown_module.remove_stale_cgroups()
    assert not stale.exists()
