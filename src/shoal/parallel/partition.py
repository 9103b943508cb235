"""Splitting a sequence of layers into contiguous parts (pure arithmetic).

``min_max_split`` is the exact answer to "cut these n weights into k
contiguous runs so that the heaviest run is as light as possible", optionally
with a cap on a second quantity per run (memory). Dynamic programming over cut
points: O(k n^2), instant for the few hundred layers or tensors of a model.
Pipeline stages (weights = measured layer times, cap = memory per worker) and
parameter-server shards (weights = tensor sizes) both use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class NoFeasibleSplit(ValueError):
    """No contiguous split meets the cap."""


def min_max_split(weights: Sequence[float], parts: int, *, sizes: Sequence[float] | None = None,
                  cap: float | None = None) -> list[range]:
    """``parts`` contiguous, non-empty index ranges covering ``weights`` that
    minimise the largest part's total weight; with ``sizes`` and ``cap``, every
    part's total size must be <= ``cap`` (raises :class:`NoFeasibleSplit` when
    none is)."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} layers into {parts} non-empty parts")
    if (sizes is None) != (cap is None):
        raise ValueError("give sizes and cap together")
    w = _prefix(weights)
    m = _prefix(sizes) if sizes is not None else None

    def fits(j: int, i: int) -> bool:
        return m is None or m[i] - m[j] <= cap  # type: ignore[operator]

    inf = math.inf
    # best[k][i]: the heaviest part when the first i layers make k parts; cut[k][i]: where the last part starts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or not fits(j, i):
                    continue
                candidate = max(best[k - 1][j], w[i] - w[j])
                if candidate < best[k][i]:
                    best[k][i], cut[k][i] = candidate, j
    if best[parts][n] == inf:
        raise NoFeasibleSplit(f"no split of {n} layers into {parts} parts keeps every part under {cap:,.0f}")
    bounds, end = [], n
    for k in range(parts, 0, -1):
        start = cut[k][end]
        bounds.append(range(start, end))
        end = start
    return bounds[::-1]


def equal_split(n: int, parts: int) -> list[range]:
    """The naive split: the same number of layers per part (the first parts take one more)."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} layers into {parts} non-empty parts")
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + base + (1 if k < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


def imbalance(weights: Sequence[float], bounds: Sequence[range]) -> float:
    """Heaviest part over the mean part (1.0 = perfectly balanced)."""
    totals = [sum(weights[i] for i in part) for part in bounds]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + float(v))
    return out
