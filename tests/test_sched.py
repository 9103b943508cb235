"""Scheduling: gang placement, the policies' decisions, and the trace-driven simulator (``shoal sched simulate``)."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.cli.sched import split_specs
from shoal.platform import simulate
from shoal.platform.cluster import Cluster, PlacementError
from shoal.platform.simulate import Simulation, TraceJob
from shoal.registry import POLICIES, load_builtins
from tests.conftest import run_cli

load_builtins(POLICIES)
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "philly-jobs.csv"
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason=f"the Philly trace is not at {TRACE}")


def policy(spec):
    c = POLICIES.resolve(spec)
    return c.target(c.options)


def run(spec, jobs, gpus=8, per_node=8, restart_cost=0.0):
    sim = Simulation(policy(spec), gpus, per_node=per_node, restart_cost=restart_cost, check=True)
    return {j.id: j for j in sim.run(jobs)}, sim


def job(i, submit, duration, gpus=1, queue="a", priority=0):
    return TraceJob(i, float(submit), float(duration), gpus, queue, priority)


def test_small_jobs_go_on_the_fullest_node_and_large_ones_on_whole_nodes():
    cluster = Cluster(24, per_node=8)
    assert cluster.allocate(1, 3) == ((0, 3),)
    assert cluster.allocate(2, 4) == ((0, 4),)  # best fit: node 0 has 5 free, the fullest that fits
    assert cluster.allocate(3, 12) == ((1, 8), (2, 4))  # whole free nodes, the last one partly
    assert cluster.allocate(4, 8) is None and 4 not in cluster.held  # no whole node left: nothing held
    assert cluster.allocate(5, 2) == ((2, 2),)
    cluster.check()
    cluster.release(3)
    assert cluster.free == [1, 8, 6] and cluster.free_total == 15
    # 16 GPUs need a second whole node beside node 1: node 0 once jobs 1 and 2 (7 GPUs) go, or node 2 once job 5 does.
    assert not cluster.fits_after(16, {0: 4}) and cluster.fits_after(16, {0: 7}) and cluster.fits_after(16, {2: 2})
    assert cluster.fits_after(4, {0: 3}) and not cluster.fits_after(7, {0: 4})
    assert not Cluster(20, per_node=8).could_ever_fit(24)  # 2 whole nodes and a 4-GPU one
    assert Cluster(20, per_node=8).could_ever_fit(16)


def test_the_invariant_check_catches_a_broken_allocation():
    cluster = Cluster(16)
    cluster.allocate(1, 4)
    cluster.free[0] += 1  # a GPU counted free and held at once
    with pytest.raises(PlacementError, match="node 0"):
        cluster.check()


def test_fifo_blocks_behind_its_head_and_backfill_does_not():
    jobs = [job(0, 0, 100, gpus=6), job(1, 1, 100, gpus=4), job(2, 2, 10, gpus=2)]
    strict, _ = run("fifo", jobs)
    assert strict[2].first_start == 100  # behind job 1, which waits for job 0
    filled, _ = run("fifo:backfill=true", jobs)
    assert filled[2].first_start == 2 and filled[1].first_start == 100


def test_priority_preempts_lower_classes_only_and_pays_the_restart():
    jobs = [job(0, 0, 100, gpus=8), job(1, 10, 50, gpus=8, priority=1), job(2, 20, 50, gpus=8)]
    done, sim = run("priority", jobs, restart_cost=5)
    assert done[1].first_start == 10 and done[0].preemptions == 1
    # Job 0 resumes after job 1 (60), before job 2 (same class, later): 90 s of work left plus the restart.
    assert done[0].finished == pytest.approx(60 + 90 + 5)
    assert done[2].preemptions == 0 and done[2].first_start == done[0].finished


def test_las_lets_a_new_job_preempt_one_past_its_threshold_but_not_one_below():
    jobs = [job(0, 0, 1000), job(1, 200, 10), job(2, 300, 10)]
    done, _ = run("las:thresholds=[100]", jobs, gpus=1, per_node=1)
    assert done[1].first_start == 200 and done[0].preemptions == 2  # job 0 had 100 GPU-s: level 1
    young = [job(0, 0, 1000), job(1, 50, 10)]
    done, _ = run("las:thresholds=[100]", young, gpus=1, per_node=1)
    # Same level at 50 s: job 1 waits; at 100 s job 0 crosses the threshold and job 1 preempts it.
    assert done[1].first_start == 100 and done[0].preemptions == 1


def test_las_bounded_protects_a_fresh_start_and_promotes_a_starving_job():
    jobs = [job(0, 0, 5000), job(1, 200, 100)]
    done, _ = run("las-bounded:thresholds=[100],min_run_s=600", jobs, gpus=1, per_node=1)
    assert done[1].first_start == 600  # job 0 may be preempted only after 600 s of running
    # A stream of short jobs would starve job 0 under LAS; here it is promoted after 2x its run (and >= 50 s).
    stream = [job(0, 0, 1000)] + [job(i, 100 + 60 * (i - 1), 60) for i in range(1, 200)]  # a saturating stream
    las, _ = run("las:thresholds=[50]", stream, gpus=1, per_node=1)
    bounded, _ = run("las-bounded:thresholds=[50],min_run_s=300,starve_after_s=50,starve_factor=2", stream,
                     gpus=1, per_node=1)
    assert bounded[0].finished < 5000 < las[0].finished
    assert las[0].finished == max(j.finished for j in las.values())  # LAS ran it last


def test_drf_serves_the_queue_with_the_smaller_share_first():
    jobs = [job(0, 0, 200, gpus=4, queue="a"), job(1, 0, 100, gpus=4, queue="a"), job(2, 1, 100, gpus=4, queue="a"),
            job(3, 2, 100, gpus=4, queue="b")]
    done, _ = run("drf", jobs)
    assert done[3].first_start == 100 and done[2].first_start > 100  # b's job before a's third
    fifo, _ = run("fifo", jobs)
    assert fifo[2].first_start == 100 and fifo[3].first_start > 100


def test_every_policy_keeps_gangs_whole_and_conserves_work_on_a_random_trace():
    rng = np.random.default_rng(3)
    jobs = [job(i, t, d, gpus=int(g), queue=q, priority=int(p)) for i, (t, d, g, q, p) in enumerate(zip(
        np.cumsum(rng.exponential(40, 300)), rng.lognormal(5, 1.5, 300), rng.choice([1, 1, 1, 2, 4, 8, 16], 300),
        rng.choice(["a", "b", "c"], 300), rng.random(300) < 0.2))]
    for spec in POLICIES.names():
        done, sim = run(spec, jobs, gpus=32, restart_cost=30)  # check=True: the invariant after every decision
        assert len(done) == 300 and not sim.running and sim.cluster.free_total == 32
        restarts = sum(j.preemptions * 30 * j.gpus for j in done.values())
        assert sim.busy_gpu_s == pytest.approx(sum(j.duration * j.gpus for j in jobs) + restarts, rel=1e-9), spec
        for j in jobs:
            assert done[j.id].finished >= j.submit + j.duration


def test_a_job_no_placement_could_hold_is_refused_not_queued():
    done, sim = run("fifo", [job(0, 0, 10, gpus=12), job(1, 0, 10)], gpus=16, per_node=8)
    assert set(done) == {0, 1} and not sim.refused  # 12 GPUs: two whole nodes
    done, sim = run("fifo", [job(0, 0, 10, gpus=24), job(1, 0, 10)], gpus=16, per_node=8)
    assert set(done) == {1} and [t.id for t in sim.refused] == [0]


def test_policy_lists_keep_options_with_their_policy():
    assert split_specs("fifo,las:thresholds=[1800,7200],min_run_s=0,drf") == [
        "fifo", "las:thresholds=[1800,7200],min_run_s=0", "drf"]
    with pytest.raises(ValueError, match="same policy twice"):
        split_specs("fifo,fifo")
    with pytest.raises(ValueError, match="starts with an option"):
        split_specs("backfill=true,fifo")
    with pytest.raises(ValueError, match="thresholds: .*increasing"):
        POLICIES.resolve("las:thresholds=[10,5]")


@needs_trace
def test_fifo_on_one_pool_reproduces_the_reference_figures():
    # The reference: FIFO on 520 GPUs as one pool, 2017-10-01..14 (24,134 jobs): mean JCT 10.5 h, p99 51.8 h.
    trace = simulate.read_philly(TRACE, simulate.parse_window("2017-10-01:2017-10-14"))
    assert len(trace) == 24_134
    summary, _ = simulate.run_one(policy("fifo"), trace, gpus=520, per_node=520, load=1.0, restart_cost=60)
    assert summary["avg_jct_h"] == pytest.approx(10.5, rel=0.1)
    assert summary["p99_jct_h"] == pytest.approx(51.8, rel=0.1)


@needs_trace
@pytest.mark.processes
def test_the_cli_replays_a_day_of_the_trace_and_writes_its_report(tmp_path):
    done = run_cli("sched", "simulate", "--trace", str(TRACE), "--window", "2017-10-03:2017-10-03", "--gpus", "64",
                   "--policy", "fifo,las:thresholds=[1800],las-bounded", "--load", "1.0,1.3", "--check",
                   "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["fifo@1", "las:thresholds=[1800]@1", "las-bounded@1",
                                          "fifo@1.3", "las:thresholds=[1800]@1.3", "las-bounded@1.3"]
    for row in rows:
        assert row["jobs"] > 300 and row["p50_jct_h"] <= row["p95_jct_h"] <= row["p99_jct_h"]
        assert 0 < row["utilisation"] <= 1
    assert rows[0]["preemptions_per_job"] == 0 and rows[0]["avg_jct_vs_first"] == 1
    assert (tmp_path / "jct-cdf-load1.png").exists() and (tmp_path / "report.html").exists()


def test_bad_input_exits_2_naming_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("when,how_long\n1,2\n")
    cases = [(["--policy", "fifo,sjf"], "unknown scheduling policy 'sjf'; allowed: drf, fifo, las, las-bounded"),
             (["--trace", str(bad)], "not a Philly trace, columns ['cluster', 'duration', 'num_gpus', 'timestamp']"),
             (["--trace", str(tmp_path / "none.csv")], "--trace: "),
             (["--window", "2017-10-05:2017-10-01"], "ends before it starts"),
             (["--load", "0"], "--load: every factor must be in (0, 100]")]
    wide = tmp_path / "wide.csv"
    wide.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-03 10:00:00,60,8,480,a\n")
    cases.append((["--trace", str(wide), "--gpus", "4"], "--gpus: no job of the trace fits on 4 GPUs (8 a node)"))
    for args, message in cases:
        result = CliRunner().invoke(app, ["sched", "simulate", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.processes
def test_a_bad_policy_option_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    done = run_cli("sched", "simulate", "--policy", "las:thresholds=[10,5]", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "thresholds: Value error" not in done.stderr and "Traceback" not in done.stderr
    assert "scheduling policy 'las': thresholds: must be positive and increasing, got [10.0, 5.0]" in done.stderr
