"""``shoal serve``: a real HTTP service on loopback, real job processes, real cgroups where writable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from shoal.platform.client import Client, ServiceError
from shoal.platform.node import detect_cgroups, discover
from shoal.platform.service import build

PY = sys.executable


@contextmanager
def service(tmp_path: Path, *, policy: str = "fifo", cpus: int = 2, memory_mb: int = 4096, cgroups: bool = False,
            **options):
    svc = build(tmp_path / "state", policy=policy, node=discover(cpus, memory_mb, 0), cgroups=cgroups, tick_s=0.1,
                check=True, **options)
    server = uvicorn.Server(uvicorn.Config(svc.app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    svc.agent.start()
    url = f"http://127.0.0.1:{port}"
    admin = Client(url, (svc.state / "admin.token").read_text().strip())
    try:
        yield svc, admin
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        svc.agent.close()
        for child in svc.agent.children.values():
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        svc.store.close()


def command(code: str, *, workers: int = 1, **fields) -> dict:
    return {"kind": "command", "command": [PY, "-c", code], "workers": workers, **fields}


def test_refusals_name_the_reason(tmp_path):
    with service(tmp_path) as (svc, admin):
        url = admin.url
        with pytest.raises(ServiceError, match="token is required") as err:
            Client(url, None).list()
        assert err.value.status == 401
        with pytest.raises(ServiceError, match="unknown token"):
            Client(url, "not-a-token").list()
        alice = Client(url, admin.add_user("alice")["token"])
        bob = Client(url, admin.add_user("bob")["token"])
        with pytest.raises(ServiceError, match="only an admin") as err:
            alice.add_user("mallory", "admin")
        assert err.value.status == 403
        with pytest.raises(ServiceError, match="workers: Input should be greater than or equal to 1") as err:
            alice.submit(command("pass", workers=0))
        assert err.value.status == 422
        with pytest.raises(ServiceError, match="resources.cpus: the job needs 3 at 3 workers; this machine has 2"):
            alice.submit(command("pass", workers=3))
        with pytest.raises(ServiceError, match="command: kind=command needs a command line"):
            alice.submit({"kind": "command"})
        with pytest.raises(ServiceError, match="priority: 5 is above 0") as err:
            alice.submit(command("pass", priority=5))
        assert err.value.status == 403
        with pytest.raises(ServiceError, match="optimizer.lr"):
            alice.submit({"kind": "train", "config": {"model": "mlp", "data": {"dataset": "digits"},
                                                       "optimizer": {"name": "sgd", "lr": -1}}})
        job = alice.submit(command("pass"))["id"]
        with pytest.raises(ServiceError, match=f"no job {job}") as err:
            bob.show(job)  # another user's job is as good as absent
        assert err.value.status == 404
        with pytest.raises(ServiceError, match=f"no job {job}"):
            bob.cancel(job)
        assert [j["id"] for j in bob.list()] == []
        assert [j["id"] for j in admin.list(everyone=True)] == [job]


def test_cli_prints_one_line_and_exits_2_on_a_bad_spec(tmp_path):
    with service(tmp_path) as (svc, admin):
        spec = tmp_path / "bad.yaml"
        spec.write_text("kind: command\ncommand: ['true']\nworkers: 2\nresources: {cpus: 4}\n")
        env = dict(os.environ, SHOAL_URL=admin.url, SHOAL_TOKEN=admin.token)
        done = subprocess.run([PY, "-m", "shoal.cli", "job", "submit", str(spec)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "resources.cpus: the job needs 8 at 2 workers; this machine has 2" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_jobs_run_as_gangs_in_order_and_end_with_their_status(tmp_path):
    with service(tmp_path, policy="fifo") as (svc, admin):
        # Two CPUs: a 2-worker gang, then two 1-worker jobs that may run together, one failing.
        first = admin.submit(command("import os, time; time.sleep(0.5); print('workers', os.environ['SHOAL_JOB_WORKERS'])",
                                     workers=2))["id"]
        ok = admin.submit(command("print('ok')"))["id"]
        bad = admin.submit(command("import sys; sys.exit(3)"))["id"]
        assert admin.wait(first)["state"] == "done"
        done, failed = admin.wait(ok), admin.wait(bad)
        assert done["state"] == "done" and done["exit_code"] == 0
        assert failed["state"] == "failed" and failed["reason"] == "exited with status 3"
        assert admin.logs(first)["text"] == "workers 2\n"
        # The gang ran alone: neither later job started before it had finished.
        assert done["first_start"] >= admin.show(first)["finished"] - 0.05
        shown = admin.show(first)
        assert [e["text"] for e in shown["events"]][0] == "submitted by admin"
        assert shown["cpus"] is None and shown["workers"] == 2


def test_a_retried_submit_with_its_key_makes_one_job(tmp_path):
    with service(tmp_path) as (svc, admin):
        first = admin.submit(command("pass"), client_key="k1")
        again = admin.submit(command("pass"), client_key="k1")
        assert again["id"] == first["id"] and again["created"] is False
        assert len(admin.list(everyone=True)) == 1


def test_a_quota_holds_a_users_jobs_back(tmp_path):
    with service(tmp_path) as (svc, admin):
        alice = Client(admin.url, admin.add_user("alice", quota_cpus=1)["token"])
        with pytest.raises(ServiceError, match="the job needs 2 CPUs at its fewest workers; alice's quota is 1"):
            alice.submit(command("pass", workers=2))
        long = alice.submit(command("import time; time.sleep(1.5)"))["id"]
        held = alice.submit(command("pass"))["id"]
        deadline = time.monotonic() + 20
        while alice.show(long)["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.4)
        waiting = alice.show(held)
        assert waiting["state"] == "pending"
        assert waiting["waiting"] == "quota: alice holds 1 of 1 CPUs and this job needs 1"
        assert alice.wait(held)["state"] == "done"
        assert alice.show(held)["first_start"] >= alice.show(long)["finished"] - 0.05


def test_priority_preempts_and_the_victim_runs_again(tmp_path):
    with service(tmp_path, policy="priority", grace_s=5) as (svc, admin):
        marker = tmp_path / "starts"
        low = admin.submit(command(f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(60)",
                                   workers=2, priority=0))["id"]
        deadline = time.monotonic() + 20
        while admin.show(low)["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        high = admin.submit(command("print('high')", workers=2, priority=1))["id"]
        assert admin.wait(high, timeout_s=30)["state"] == "done"
        victim = admin.show(low)
        assert victim["preemptions"] == 1 and victim["state"] in ("running", "pending")
        assert victim["attempt"] == 2 or victim["state"] == "pending"
        texts = [e["text"] for e in victim["events"]]
        assert "preempted for a job ranked higher" in texts
        assert admin.cancel(low)["state"] in ("stopping", "cancelled")
        assert admin.wait(low, timeout_s=30)["state"] == "cancelled"


def test_the_victim_is_the_job_that_loses_least(tmp_path):
    """Two command jobs a priority-0 job may preempt: rank alone would take the lower one (priority -2),
    which has run longest; it loses least to take the one that has just started."""
    with service(tmp_path, policy="priority", grace_s=5) as (svc, admin):
        old = admin.submit(command("import time; time.sleep(60)", priority=-2))["id"]
        _wait_for(lambda: admin.show(old)["state"] == "running", 20)
        time.sleep(1.5)
        young = admin.submit(command("import time; time.sleep(60)", priority=-1))["id"]
        _wait_for(lambda: admin.show(young)["state"] == "running", 20)
        urgent = admin.submit(command("print('urgent')", priority=0))["id"]
        assert admin.wait(urgent, timeout_s=30)["state"] == "done"
        # (Once preempted, the young job may in turn preempt the old one, which it outranks: the policy at
        # work. The first victim is what is checked.)
        stops = sorted((e["at"], job) for job in (old, young) for e in admin.show(job)["events"]
                       if e["text"] == "preempted for a job ranked higher")
        assert stops and stops[0][1] == young
        assert admin.show(urgent)["first_start"] < (stops[1][0] if len(stops) > 1 else float("inf"))
        for job in (old, young):
            admin.cancel(job)


@pytest.mark.skipif(detect_cgroups() is None, reason="no writable cgroup v1 or v2 hierarchy here (needs root)")
def test_cgroups_hold_a_job_to_its_cpus_and_kill_it_over_its_memory(tmp_path):
    with service(tmp_path, cgroups=True) as (svc, admin):
        pinned = admin.submit(command("print(open('/proc/self/status').read())"))["id"]
        hog = admin.submit(command("b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])",
                                   resources={"memory_mb": 64}))["id"]
        assert admin.wait(pinned)["state"] == "done"
        status = admin.logs(pinned)["text"]
        cpus = admin.show(pinned)["events"][1]["text"]
        allowed = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        assert f"CPUs {allowed})" in cpus  # the job ran on exactly the CPU it was given
        failed = admin.wait(hog)
        assert failed["state"] == "failed"
        assert failed["reason"] == "killed by the kernel: over its memory limit of 64 MiB"


@pytest.mark.processes
def test_a_killed_service_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL the service while jobs run and wait; the restarted service adopts the running ones."""
    state = tmp_path / "state"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", "shoal.cli", "serve", "--state", str(state), "--port", str(port),
                                 "--cpus", "4", "--gpus", "0", "--memory-mb", "4096", "--no-cgroups",
                                 "--policy", "fifo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    server = start()
    try:
        admin = Client(url, None, retry_s=60)
        deadline = time.monotonic() + 60
        while not (state / "admin.token").is_file():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        admin.token = (state / "admin.token").read_text().strip()
        out = tmp_path / "runs"
        out.mkdir()
        jobs = [admin.submit(command(f"import time; open({str(out / str(i))!r}, 'a').write('start\\n'); "
                                     f"time.sleep(2); open({str(out / str(i))!r}, 'a').write('end\\n')"))["id"]
                for i in range(6)]
        time.sleep(1.0)
        for _ in range(2):
            server.send_signal(signal.SIGKILL)
            server.wait()
            server = start()
            time.sleep(1.5)
        rows = [admin.wait(j, timeout_s=120) for j in jobs]
        assert [r["state"] for r in rows] == ["done"] * 6
        assert len(admin.list(everyone=True)) == 6
        for i in range(6):  # each ran once, whole: adopted, never started twice
            assert (out / str(i)).read_text() == "start\nend\n"
    finally:
        server.kill()
        server.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.processes
def test_a_train_job_grows_is_preempted_resized_and_resumes_without_losing_a_step(tmp_path):
    config = {"seed": 0, "model": "mlp", "data": {"dataset": "digits", "batch_size": 16},
              "optimizer": {"name": "sgd", "lr": 0.05}, "train": {"steps": 1500, "eval_every": 500,
                                                                   "checkpoint_every": 10_000, "log_every": 10}}
    with service(tmp_path, policy="priority", cpus=2, grace_s=60, grow_after_s=3) as (svc, admin):
        blocker = admin.submit(command("import time; time.sleep(5)"))["id"]
        _wait_for(lambda: admin.show(blocker)["state"] == "running", 20)
        job = admin.submit({"kind": "train", "config": config, "min_workers": 1, "max_workers": 2})["id"]
        run = svc.agent.job_dir(job) / "run"
        _wait_for(lambda: admin.show(job)["state"] == "running", 20)
        assert admin.show(job)["workers"] == 1  # one CPU was free
        # The blocker ends; after grow_after_s, with nothing waiting, the job grows onto both CPUs.
        _wait_for(lambda: admin.show(job)["attempt"] == 2 and admin.show(job)["state"] == "running", 90)
        assert admin.show(job)["workers"] == 2
        grown_at = _steps(run)[-1] if _steps(run) else 0
        _wait_for(lambda: _steps(run) and _steps(run)[-1] >= grown_at + 50, 90)
        high = admin.submit(command("print('urgent')", workers=2, priority=1))["id"]
        assert admin.wait(high, timeout_s=90)["state"] == "done"
        _wait_for(lambda: admin.show(job)["attempt"] == 3 and admin.show(job)["state"] == "running", 60)
        admin.resize(job, 1)
        final = admin.wait(job, timeout_s=180)
        assert final["state"] == "done", admin.logs(job)["text"][-3000:]
        assert final["preemptions"] == 1 and final["attempt"] == 4 and final["workers"] == 1
        steps = _steps(run)
        assert steps == sorted(set(steps)) and steps[-1] == 1500  # no step lost or repeated in the log
        assert json.loads((run / "summary.json").read_text())["steps"] == 1500
        assert json.loads((svc.agent.job_dir(job) / "global_batch.json").read_text())["global_batch"] == 32
        import yaml

        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == 32  # 1 worker x 32
        events = [e["text"] for e in admin.show(job)["events"]]
        assert "growing from 1 to 2 workers (room is free)" in events


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and "step" in record:
            steps.append(record["step"])
    return steps


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _tiny_train(steps: int) -> dict:
    return {"seed": 0, "model": "mlp", "data": {"dataset": "digits", "batch_size": 16},
            "optimizer": {"name": "sgd", "lr": 0.05},
            "train": {"steps": steps, "eval_every": 50, "checkpoint_every": 100_000, "log_every": 10}}


@pytest.mark.processes
def test_the_dashboard_shows_queue_curves_node_and_shares_in_a_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import shutil

    chromium = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium: /usr/bin/chromium absent and none on PATH (apt-get install chromium)")
    with service(tmp_path, policy="fifo", cpus=2) as (svc, admin):
        alice = Client(admin.url, admin.add_user("alice")["token"])
        train = admin.submit({"kind": "train", "name": "digits", "config": _tiny_train(100_000), "workers": 2})["id"]
        run = svc.agent.job_dir(train) / "run"
        _wait_for(lambda: len(_steps(run)) >= 6, 90)
        queued = alice.submit(command("pass", workers=2, name="behind"))["id"]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # tests run as root
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(admin.url + "/")
                page.fill("#token", "not-a-token")
                page.click("#login button")
                page.wait_for_selector("#login-error:has-text('401')")
                page.fill("#token", admin.token)
                page.click("#login button")

                page.wait_for_selector("#view[data-view=queue] table")
                cells = page.locator("#view[data-view=queue] tbody tr").first.locator("td").all_inner_texts()
                assert cells[:4] == ["1", str(queued), "behind", "alice"]
                assert cells[6] == "waiting for 2 CPUs (0 free)"
                page.screenshot(path=str(tmp_path / "dashboard-queue.png"), full_page=True)

                page.click("nav button[data-view=running]")
                card = page.locator(f"#view[data-view=running] .card[data-job='{train}']")
                card.locator("polyline[data-series=loss]").wait_for()
                assert len(card.locator("polyline[data-series=loss]").get_attribute("points").split()) >= 6
                assert card.locator("polyline[data-series=acc]").count() == 1  # evaluated at step 50 on
                assert card.locator(".latest").inner_text().startswith("step ")
                page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)

                page.click("nav button[data-view=node]")
                page.wait_for_selector("#view[data-view=node] .utilisation")
                assert page.inner_text("#view[data-view=node] .utilisation").startswith("CPUs in use: 2 of 2")
                assert page.locator("#view[data-view=node] polyline[data-series=cpus]").count() == 1
                page.screenshot(path=str(tmp_path / "dashboard-node.png"), full_page=True)

                page.click("nav button[data-view=shares]")
                page.wait_for_selector("#view[data-view=shares] table")
                rows = {r.locator("td").first.inner_text(): r.locator("td").all_inner_texts()
                        for r in page.locator("#view[data-view=shares] tbody tr").all()}
                assert rows["admin"][1:4] == ["2", "1.00", "0.50"] and rows["alice"][1:5] == ["0", "0.00", "0.50", "1"]
                page.screenshot(path=str(tmp_path / "dashboard-shares.png"), full_page=True)
            finally:
                browser.close()
        for view in ("queue", "running", "node", "shares"):
            assert (tmp_path / f"dashboard-{view}.png").stat().st_size > 5_000
        admin.cancel(train)
        admin.wait(train, timeout_s=60)
