"""`shoal train --nnodes 2`: two launchers (two "nodes") forming one job over loopback."""

import json
import subprocess
import sys
import uuid

import pytest
import yaml

from shoal.launch import free_port
from tests.conftest import ROOT, small_config


@pytest.mark.processes
def test_two_shoal_launchers_form_one_four_rank_job(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(small_config(out, train__steps=30, train__eval_every=30)))
    endpoint, job = f"127.0.0.1:{free_port()}", f"t{uuid.uuid4().hex[:6]}"
    common = ["train", str(cfg), "--workers", "2", "--nnodes", "2", "--rdzv-endpoint", endpoint,
              "--rdzv-id", job, "--local-addr", "127.0.0.1"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "shoal.cli", *common, flag], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flag in ("--is-host", "--not-host")
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 4 and summary["steps"] == 30
    # Exactly one node holds rank 0 and prints the summary table.
    assert sum("final test accuracy" in stdout for stdout, _ in outputs) == 1
