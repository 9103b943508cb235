"""A bound on how far one client's update may move the global model.

A finite update can still be huge (a delta of 1e30 passes every format
check) and one client can outweigh the rest. ``server.max_update_norm``
bounds each update's L2 norm absolutely, ``server.max_update_norm_median``
as a multiple of the round's median norm (robust while fewer than half the
clients are hostile); with both, the smaller bound holds. An update over the
bound is rejected or clipped to it (``server.update_norm_action``), and the
round's metrics name the clients either way.
"""

from __future__ import annotations

import dataclasses
import statistics

from shoal.fl.strategies.base import ClientResult


def norm_bound(norms: list[float], *, limit: float | None, median_multiple: float | None) -> float | None:
    """The round's bound on an update's norm, or None when none is configured."""
    bounds = [limit] if limit is not None else []
    if median_multiple is not None and norms:
        bounds.append(median_multiple * statistics.median(norms))
    return min(bounds) if bounds else None


def bound_updates(results: list[ClientResult], *, limit: float | None, median_multiple: float | None,
                  action: str) -> tuple[list[ClientResult], list[str], list[str]]:
    """``(kept, clipped, rejected)``: the results to aggregate (clipped ones scaled to the
    bound) and the clients whose update was clipped or rejected."""
    norms = [float(r.delta.norm()) for r in results]
    bound = norm_bound(norms, limit=limit, median_multiple=median_multiple)
    if bound is None:
        return list(results), [], []
    kept, clipped, rejected = [], [], []
    for result, norm in zip(results, norms):
        if norm <= bound:
            kept.append(result)
        elif action == "clip":
            kept.append(dataclasses.replace(result, delta=result.delta * (bound / norm)))
            clipped.append(result.client)
        else:
            rejected.append(result.client)
    return kept, clipped, rejected
