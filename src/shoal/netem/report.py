"""A running testbed's hosts as the table ``shoal netem up`` prints."""

from __future__ import annotations

from rich.table import Table

from shoal.netem.testbed import Testbed


def hosts_table(testbed: Testbed) -> Table:
    """One row per host: its index, namespace, address and link rate."""
    table = Table(title=f"shoal testbed {testbed.run_id}")
    for column in ("host", "namespace", "address", "link"):
        table.add_column(column)
    for i in range(testbed.hosts):
        table.add_row(str(i), testbed.namespace(i), testbed.host_address(i), testbed.rates[i] or "unshaped")
    return table
