"""An emulated cluster on one machine: one network namespace per host.

Each host is a namespace ``shoal-<id>-<i>`` whose ``eth0`` (one end of a veth
pair) is addressed ``198.18.0.<i+1>/24`` — the benchmarking range, so nothing
here is routable to a real network. The other ends of the veth pairs hang off
one Linux bridge in the root namespace. The bridge gets no address, so traffic
can only flow between the hosts of this testbed. A host's link is optionally
shaped on its egress with ``tc ... tbf`` (``netem`` is not available on the
machines this runs on; ``tbf`` is).

Every name carries a short random run id, so a leftover or concurrent testbed
never collides with this one, and :func:`down_all` can find and remove stale
ones by prefix. Linux interface names are limited to 15 characters, hence
``shoal<id>b`` for the bridge and ``shoal<id>v<i>`` for the root-side veth ends.

Workers started inside a namespace need ``GLOO_SOCKET_IFNAME=eth0`` (and
``TP_SOCKET_IFNAME=eth0`` for RPC's TensorPipe): the machine's hostname does
not resolve to the namespace's address there, and gloo would otherwise pick an
address it cannot use. :meth:`Testbed.popen` sets both unless the caller's
``env`` already does.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

PREFIX = "shoal"
SUBNET = "198.18.0"
MAX_HOSTS = 250  # .1 ... .250, and interface names stay <= 15 characters

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


class TestbedError(RuntimeError):
    """A command that builds or tears down the testbed failed."""

    __test__ = False  # not a pytest test class despite the name


def check_available() -> str | None:
    """Why a testbed cannot be built here, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "building network namespaces needs root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate string such as ``100mbit`` or ``1gbit``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", rate)
    unit = (m.group(2).lower() or "bit") if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"rate {rate!r}: expected a tc rate such as '100mbit' or '1gbit'")
    return float(m.group(1)) * _UNITS[unit]


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}")
    return proc


def _stale_links(run_id: str = "") -> list[str]:
    out = _sh(["ip", "-o", "link", "show"], check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(PREFIX + run_id)]


def _stale_namespaces(run_id: str = "") -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}-{run_id}")]


def _remove(run_id: str = "") -> None:
    # A namespace outlives "ip netns delete" while processes remain in it, so
    # those (e.g. workers torchrun started in their own sessions) are killed
    # first. Deleting a namespace destroys its eth0 and with it the veth peer;
    # the explicit link deletes cover half-built pairs and the bridge.
    for ns in _stale_namespaces(run_id):
        for pid in _sh(["ip", "netns", "pids", ns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _sh(["ip", "netns", "delete", ns], check=False)
    for link in sorted(_stale_links(run_id), key=lambda n: n.endswith("b")):  # bridge last
        _sh(["ip", "link", "delete", link], check=False)


def down_one(run_id: str) -> list[str]:
    """Remove the testbed with this id; return what was found (empty: none)."""
    if not re.fullmatch(r"[0-9a-f]{6}", run_id):
        raise ValueError(f"testbed id {run_id!r}: expected the 6 hex digits 'netem up' printed")
    found = _stale_namespaces(run_id) + _stale_links(run_id)
    _remove(run_id)
    return found


def down_all() -> list[str]:
    """Remove every shoal testbed on this machine (any run id); return what was found."""
    found = _stale_namespaces() + _stale_links()
    _remove()
    return found


class Testbed:
    """``with Testbed(2, rate="100mbit") as tb: tb.popen(0, [...])``.

    ``rate`` is a tc rate string for every host, a list with one per host, or
    None for unshaped links. Everything is removed on exit, and on a failure
    part-way through :meth:`up`.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, hosts: int = 2, rate: str | None | Sequence[str | None] = None,
                 latency: str = "50ms", run_id: str | None = None) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, got {hosts}")
        rates = [rate] * hosts if rate is None or isinstance(rate, str) else list(rate)
        if len(rates) != hosts:
            raise ValueError(f"rate: got {len(rates)} rates for {hosts} hosts")
        for r in rates:
            if r is not None:
                rate_bits(r)  # validate before touching the system
        self.hosts = hosts
        self.rates = rates
        self.latency = latency
        self.run_id = run_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-f]{6}", self.run_id):  # fixed width: no id is a prefix of another
            raise ValueError("run_id: 6 lowercase hex digits")
        self.bridge = f"{PREFIX}{self.run_id}b"
        self._is_up = False

    def host_address(self, i: int) -> str:
        """IPv4 address of host ``i`` (0-based): 198.18.0.<i+1>."""
        self._check_index(i)
        return f"{SUBNET}.{i + 1}"

    def namespace(self, i: int) -> str:
        self._check_index(i)
        return f"{PREFIX}-{self.run_id}-{i}"

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.hosts:
            raise IndexError(f"host {i} out of range 0..{self.hosts - 1}")

    def up(self) -> "Testbed":
        reason = check_available()
        if reason:
            raise TestbedError(f"cannot build a testbed: {reason}")
        try:
            _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            _sh(["ip", "link", "set", self.bridge, "up"])
            for i in range(self.hosts):
                self._add_host(i)
        except BaseException:
            self.down()
            raise
        self._is_up = True
        return self

    def _add_host(self, i: int) -> None:
        ns, veth = self.namespace(i), f"{PREFIX}{self.run_id}v{i}"
        _sh(["ip", "netns", "add", ns])
        # Create the peer directly inside the namespace: "eth0" would clash
        # with the root namespace's own eth0 if it were made there first.
        _sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _sh(["ip", "link", "set", veth, "master", self.bridge])
        _sh(["ip", "link", "set", veth, "up"])
        in_ns = ["ip", "netns", "exec", ns]
        _sh(in_ns + ["ip", "link", "set", "lo", "up"])
        _sh(in_ns + ["ip", "addr", "add", f"{self.host_address(i)}/24", "dev", "eth0"])
        _sh(in_ns + ["ip", "link", "set", "eth0", "up"])
        rate = self.rates[i]
        if rate is not None:
            # tbf needs a bucket of at least one timer tick at line rate; 4 ms
            # worth (rate/250) with a 32 KiB floor keeps 1gbit near line rate.
            burst = max(32 * 1024, int(rate_bits(rate) / 8 / 250))
            _sh(in_ns + ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                         "rate", rate, "burst", str(burst), "latency", self.latency])

    def down(self) -> None:
        """Remove everything this testbed created, killing any process still
        inside its namespaces (safe to call twice)."""
        _remove(self.run_id)
        self._is_up = False

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def popen(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on host ``i``. ``env`` defaults to the current
        environment; ``GLOO_SOCKET_IFNAME`` and ``TP_SOCKET_IFNAME`` are set to eth0 unless set."""
        env = _host_env(env)
        return subprocess.Popen(self.command(i, argv), env=env, **kw)

    def run(self, i: int, argv: Sequence[str], check: bool = True,
            timeout: float | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host ``i`` to completion, capturing its output."""
        env = _host_env(env)
        proc = subprocess.run(self.command(i, argv), capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise TestbedError(f"host {i}: command failed ({proc.returncode}): "
                               f"{' '.join(argv)}\n{proc.stderr.strip()}")
        return proc


def _host_env(env: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    env.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    env.setdefault("TP_SOCKET_IFNAME", "eth0")
    return env
