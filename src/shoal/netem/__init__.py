"""Emulated networks: a namespace-per-host testbed with shaped links, and the
alpha-beta cost model (``costmodel``) that predicts what one machine cannot hold."""

from shoal.netem.testbed import Testbed, TestbedError, check_available, down_all, down_one

__all__ = ["Testbed", "TestbedError", "check_available", "down_all", "down_one"]
