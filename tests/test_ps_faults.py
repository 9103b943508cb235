"""Parameter-server jobs survive their processes dying: a worker is restarted
and rejoins while the others train on; a server comes back from its shard checkpoint."""

import json

import pytest

import shoal
from shoal.launch import JobFailed
from shoal.metrics.writer import read_metrics
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import invoke_cli, small_config
from tests.test_resume_and_failures import train_from_tests

STEPS = 80


def ps_config(out, strategy="async_ps:servers=2", **fault):
    cfg = small_config(out, workers=3, strategy=strategy, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.5},
                       train__steps=STEPS, train__eval_every=40, train__checkpoint_every=10)
    cfg["fault"] = fault
    return cfg


@pytest.mark.slow
def test_a_killed_async_worker_rejoins_while_the_others_train_on(tmp_path):
    rank = 1  # it also serves shard 1: the shard outlives its worker
    summary = shoal.train(ps_config(tmp_path / "run", kill_rank=rank, kill_step=40), max_restarts=1)
    assert summary.restarts == 0  # the group was never restarted: the other workers never stopped
    assert summary.worker_restarts == 1 and summary.final_accuracy > 0.7
    assert json.loads((tmp_path / "run" / "fault.json").read_text())["rank"] == rank
    # Every push applied; the dead worker's 40th step was lost with it and done again.
    assert summary.updates == 3 * STEPS + 1
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # rank 0 went through without a break


@pytest.mark.slow
def test_ssp_waits_for_a_dead_worker_to_rejoin(tmp_path):
    summary = shoal.train(ps_config(tmp_path / "run", "ssp:staleness=2", kill_rank=2, kill_step=30),
                          max_restarts=1)
    assert summary.restarts == 0 and summary.worker_restarts == 1
    assert summary.final_accuracy > 0.7 and summary.mean_staleness <= 2 * 2


@pytest.mark.slow
def test_a_killed_parameter_server_comes_back_from_its_shard_checkpoint(tmp_path, capfd):
    result = train_from_tests(tmp_path, ps_config(tmp_path / "run"), "--kill", "1:45:server", "--max-restarts", "1",
                              cli=invoke_cli)
    stderr = result.stderr + capfd.readouterr().err  # the command's own, then what its workers wrote
    assert result.returncode == 0, stderr
    assert "shard 1 restored from its checkpoint at version" in stderr
    summary = shoal.Summary.model_validate_json((tmp_path / "run" / "summary.json").read_text())
    assert summary.restarts == 1 and summary.final_accuracy > 0.7
    assert json.loads((tmp_path / "run" / "fault.json").read_text())["target"] == "server"
    # The workers went on from the step counts they had published, not from 0.
    assert summary.resumed_from_step is not None and summary.resumed_from_step > 0
    shard = load_checkpoint(tmp_path / "run" / "shards" / "shard1.pt")  # checksum verified on load
    assert shard["version"] % 10 == 0 and shard["version"] > 0


@pytest.mark.processes
def test_a_dead_worker_without_restart_budget_fails_the_job(tmp_path, capfd):
    result = train_from_tests(tmp_path, ps_config(tmp_path / "run", kill_rank=2, kill_step=10), cli=invoke_cli)
    stderr = result.stderr + capfd.readouterr().err  # the command's own, then what its workers wrote
    assert result.returncode == 1
    assert ("rank 2's worker process was killed by SIGKILL after step 9; restart budget spent (--max-restarts 0"
            in stderr)


@pytest.mark.processes
def test_killing_a_server_needs_a_parameter_server(tmp_path):
    cfg = small_config(tmp_path / "run", train__steps=10)
    cfg["fault"] = {"kill_rank": 0, "kill_step": 5, "target": "server"}
    with pytest.raises(JobFailed, match="has no parameter server"):
        shoal.train(cfg)
