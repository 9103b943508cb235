"""Benchmark harnesses behind ``shoal bench``."""
