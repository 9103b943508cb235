"""Emulated networks: a namespace-per-host testbed with shaped links."""

from shoal.netem.testbed import Testbed, TestbedError, check_available, down_all, down_one

__all__ = ["Testbed", "TestbedError", "check_available", "down_all", "down_one"]
