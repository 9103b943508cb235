"""``shoal netem up | down``: the emulated cluster, network-namespace hosts on shaped links."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from shoal.cli.common import CONTEXT_SETTINGS, fail

netem_app = typer.Typer(help="Emulated cluster: network-namespace hosts on shaped links (needs root and iproute2).",
                        context_settings=CONTEXT_SETTINGS)


@netem_app.command("up")
def netem_up(
    hosts: int = typer.Option(2, "--hosts", "-n", help="hosts (namespaces) to create, 1-250"),
    rate: Optional[str] = typer.Option(
        None, help="tc rate of every host's link ('100mbit'), or one per host ('1gbit,1gbit,100mbit'); none = unshaped"
    ),
    latency: str = typer.Option("50ms", help="tbf queue latency bound"),
) -> None:
    """Build the testbed, print its hosts, hold it until Ctrl-C (or SIGTERM), then remove everything."""
    import signal
    import time

    from shoal.netem import Testbed, TestbedError, check_available
    from shoal.netem.report import hosts_table

    reason = check_available()
    if reason:
        fail(reason, "netem")
    rates: Optional[list[Optional[str]]] = None
    if rate:
        parts = [r.strip() or None for r in rate.split(",")]
        rates = parts * hosts if len(parts) == 1 else parts
    try:
        testbed = Testbed(hosts, rate=rates, latency=latency)
    except ValueError as err:
        fail(str(err), "netem")
    # SIGTERM and SIGHUP end the hold like Ctrl-C, so the cleanup below runs.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        with testbed:
            console = Console()
            console.print(hosts_table(testbed))
            console.print(
                f"run on host 0:  ip netns exec {testbed.namespace(0)} env GLOO_SOCKET_IFNAME=eth0 COMMAND\n"
                f"ready: press Ctrl-C to remove the testbed", highlight=False,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        Console().print(f"testbed {testbed.run_id} removed", highlight=False)
    except TestbedError as err:
        fail(str(err), "netem", code=1)


@netem_app.command("down")
def netem_down(
    run_id: Optional[str] = typer.Argument(None, help="the testbed id that 'netem up' printed"),
    all_: bool = typer.Option(False, "--all", help="remove every shoal testbed on this machine (stale ones too)"),
) -> None:
    """Remove a testbed (or all of them) that was left behind."""
    from shoal.netem import check_available, down_all, down_one

    reason = check_available()
    if reason:
        fail(reason, "netem")
    if all_ == (run_id is not None):
        fail("give a testbed id or --all", "netem down")
    if all_:
        found = down_all()
        Console().print(f"removed {len(found)} objects" + (f": {', '.join(found)}" if found else ""), highlight=False)
    else:
        try:
            found = down_one(run_id)
        except ValueError as err:
            fail(str(err), "netem down")
        Console().print(f"testbed {run_id} removed" if found else f"no testbed {run_id} here", highlight=False)
