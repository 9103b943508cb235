"""Run outputs: per-step metrics.jsonl, summary.json, curves.png."""

from shoal.metrics.summary import Summary

__all__ = ["Summary"]
