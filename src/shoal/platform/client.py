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

import http.client
import json
import threading
import time
import urllib.parse
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
        """``retry_s``: how long a request keeps retrying while the service cannot be reached (0: never).
        Each thread keeps one connection open (HTTP keep-alive) and makes a new one when it fails."""
        self.url, self.token, self.timeout_s, self.retry_s = url.rstrip("/"), token, timeout_s, retry_s
        where = urllib.parse.urlsplit(self.url)
        if where.scheme != "http" or not where.hostname:
            raise ValueError(f"url: {url!r} is not http://HOST:PORT")
        self._host, self._port, self._prefix = where.hostname, where.port or 80, where.path
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        return conn

    def _call(self, method: str, path: str, body: Any = None, *, retry_s: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        while True:
            reused = getattr(self._local, "conn", None) is not None
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                answer = conn.getresponse()
                payload = answer.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                self._local.conn = None
                stale = isinstance(err, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if reused and (stale or method == "GET" or path == "/jobs"):
                    # The service had closed this idle kept-alive connection (it never saw the request), or
                    # the call is safe to repeat (a read; a submit carries its key): once more, on a new one.
                    continue
                if time.monotonic() >= deadline:
                    raise ServiceError(0, f"cannot reach the service at {self.url}: {err}") from None
                time.sleep(0.2)
                continue
            if answer.status >= 400:
                try:
                    detail = json.loads(payload).get("detail", answer.reason)
                except (ValueError, AttributeError):
                    detail = answer.reason
                raise ServiceError(answer.status, detail if isinstance(detail, str) else json.dumps(detail))
            return json.loads(payload or b"null")

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
