"""The Python API of ``shoal serve``; ``shoal job ...`` is a thin layer over it.

    from shoal.platform.client import Client
    jobs = Client("http://127.0.0.1:8470", token)
    job = jobs.submit("job.yaml")           # a path, a mapping or a JobSpec
    for text in jobs.follow(job["id"]):     # its log as it grows, until it ends
        print(text, end="")

A refused request raises :class:`ServiceError` with the service's one-line reason and HTTP status.
``submit`` sends a fresh ``client_key`` and retries with the same key when the connection fails,
so a service that dies mid-request and comes back never ends up with the job twice.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml

from shoal.platform.spec import JobSpec, inline_config

DEFAULT_URL = "http://127.0.0.1:8470"
FINAL = ("done", "failed", "cancelled")


class ServiceError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout_s: float = 30.0,
                 retry_s: float = 0.0):
        """``retry_s``: how long a request keeps retrying while the service cannot be reached (0: never)."""
        self.url, self.token, self.timeout_s, self.retry_s = url.rstrip("/"), token, timeout_s, retry_s

    def _call(self, method: str, path: str, body: Any = None, *, retry_s: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        while True:
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return json.loads(answer.read() or b"null")
            except urllib.error.HTTPError as err:
                try:
                    detail = json.loads(err.read()).get("detail", err.reason)
                except ValueError:
                    detail = err.reason
                raise ServiceError(err.code, detail if isinstance(detail, str) else json.dumps(detail)) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if time.monotonic() >= deadline:
                    raise ServiceError(0, f"cannot reach the service at {self.url}: "
                                          f"{getattr(err, 'reason', err)}") from None
                time.sleep(0.2)

    def submit(self, spec: JobSpec | dict[str, Any] | str | Path, *, client_key: str | None = None) -> dict[str, Any]:
        """Queue a job from a spec (a YAML path: a train config path in it is read relative to the YAML)."""
        base = None
        if isinstance(spec, (str, Path)):
            base = Path(spec).parent
            try:
                spec = yaml.safe_load(Path(spec).read_text())
            except (OSError, yaml.YAMLError) as err:
                raise ServiceError(2, f"{spec}: {err}") from None
        if isinstance(spec, dict):
            try:
                spec = JobSpec.model_validate(spec)
            except ValueError as err:  # pydantic's ValidationError: said as the service would
                from shoal.config import format_error

                raise ServiceError(422, format_error(err) if hasattr(err, "errors") else str(err)) from None
        try:
            spec = inline_config(spec, base)
        except ValueError as err:
            raise ServiceError(422, str(err)) from None
        body = {"spec": spec.model_dump(exclude_none=True), "client_key": client_key or uuid.uuid4().hex}
        return self._call("POST", "/jobs", body)

    def list(self, *, state: str | None = None, everyone: bool = False, limit: int = 100,
             after: int = 0) -> list[dict[str, Any]]:
        query = f"?limit={limit}&after={after}" + (f"&state={state}" if state else "") + ("&all=true" if everyone else "")
        return self._call("GET", "/jobs" + query)

    def show(self, job: int) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job}")

    def logs(self, job: int, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job}/logs?offset={offset}")

    def follow(self, job: int, *, poll_s: float = 0.5) -> Iterator[str]:
        """The job's log from the start, as it grows, until the job has ended."""
        offset = 0
        while True:
            part = self.logs(job, offset)
            if part["text"]:
                yield part["text"]
            offset = part["offset"]
            if part["state"] in FINAL and not part["text"]:
                return
            if not part["text"]:
                time.sleep(poll_s)

    def wait(self, job: int, *, timeout_s: float = 600.0, poll_s: float = 0.3) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.show(job)
            if row["state"] in FINAL:
                return row
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is still {row['state']} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def metrics(self, job: int) -> list[dict[str, Any]]:
        return self._call("GET", f"/jobs/{job}/metrics")

    def cancel(self, job: int) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job}/cancel")

    def resize(self, job: int, workers: int) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job}/resize", {"workers": workers})

    def priority(self, job: int, priority: int) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job}/priority", {"priority": priority})

    def node(self) -> dict[str, Any]:
        return self._call("GET", "/node")

    def add_user(self, name: str, role: str = "user", *, quota_cpus: int | None = None) -> dict[str, Any]:
        return self._call("POST", "/users", {"name": name, "role": role, "quota_cpus": quota_cpus})
