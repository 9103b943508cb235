"""The README's examples, run as a newcomer would: copied out and executed."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, small_config

pytestmark = pytest.mark.processes


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block under the heading ``heading`` (any level) in README.md."""
    text = (ROOT / "README.md").read_text()
    # Up to the next heading of level 2 or more (a "# comment" inside a code block is none).
    section = re.split(rf"\n#+ {re.escape(heading)}\n", text, maxsplit=1)[1].split("\n##", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


def test_the_python_api_example_runs_as_an_unguarded_script(tmp_path):
    # Saved as a file and run: no `if __name__ == "__main__":` guard, as the
    # README prints it. Workers must not re-run the script (each one would
    # start the job again, and the first run failed with rank 1 exiting 1).
    script = tmp_path / "example.py"
    script.write_text(readme_block("Python API", "python")
                      + "\nimport json, pathlib\n"
                        "pathlib.Path('done.json').write_text(json.dumps(summary.model_dump()))\n")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "done.json").read_text())
    assert summary["steps"] == 200 and summary["final_accuracy"] > 0.5
    first = json.loads((tmp_path / "runs" / "api" / "summary.json").read_text())
    assert first["steps"] == 300 and first["workers"] == 2
    # Each worker printing the example's own line would show the script re-run in it.
    printed = [line for line in done.stdout.splitlines() if re.fullmatch(r"0\.\d+ \S+ [\d.e+]+", line.strip())]
    assert len(printed) == 1, done.stdout


def test_a_program_read_from_stdin_can_train(tmp_path):
    cfg = small_config(tmp_path / "run", train__steps=10)
    program = f"import shoal\nprint('accuracy', shoal.train({cfg!r}).final_accuracy)\n"
    done = subprocess.run([sys.executable, "-"], input=program, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy" in done.stdout
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_config_may_not_name_the_running_script_as_an_entry_point(tmp_path):
    from shoal import ConfigError, load_config

    with pytest.raises(ConfigError, match="names the running script.*mymodels:Net"):
        load_config({**small_config(tmp_path), "model": "__main__:Net"})


def test_the_two_site_federation_runs_as_the_readme_says(tmp_path):
    script = readme_block("A federation on one machine", "sh")
    with socket.socket() as sock:  # the README's port, unless something here holds it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = script.replace("127.0.0.1:8443", f"127.0.0.1:{port}")
    script = script.replace("shoal fl server examples/fl_two_sites.yaml",
                            f"shoal fl server examples/fl_two_sites.yaml --address 127.0.0.1:{port}")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "fl-two-sites" / "summary.json").read_text())
    assert summary["rounds_to_target"] is not None and summary["final_accuracy"] >= 0.85
    assert summary["mean_participants"] == 2 and summary["clients_seen"] == 2
    assert done.stdout.count("took part in") == 2
    # The simulation of the same federation may not overwrite the server's results.
    refused = subprocess.run([sys.executable, "-m", "shoal.cli", "fl", "simulate", "examples/fl_two_sites.yaml"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "holds a federated server's results" in refused.stderr, refused.stderr
