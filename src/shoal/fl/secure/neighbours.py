"""SecAgg+'s communication graph (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS): each client shares keys
and secrets with k neighbours instead of all n - 1 others.

The graph is a Harary graph H(k, n) over a random order of the participants:
on a ring in that order, each client is joined to the k/2 nearest on either
side, so every client has exactly k neighbours (k even, k < n; with
k >= n - 1 it is the complete graph of the original protocol). The order is
drawn from the round's public graph seed, so the server and every client
compute the same graph from the round's setup alone.
"""

from __future__ import annotations

import math

import numpy as np


def degree(n: int, requested: int | None = None) -> int:
    """k for n participants: ``requested`` (rounded up to even) or about 3 log2 n, at most n - 1."""
    if n <= 1:
        return 0
    k = requested if requested is not None else 3 * math.ceil(math.log2(n))
    k += k % 2
    return min(k, n - 1)


def graph(participants: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """Each participant's sorted neighbours."""
    n = len(participants)
    if k >= n - 1:
        return {u: sorted(v for v in participants if v != u) for u in participants}
    if k % 2:
        raise ValueError(f"k must be even below n - 1, got {k}")
    order = [participants[i] for i in np.random.default_rng(seed).permutation(n)]
    half = k // 2
    return {order[i]: sorted(order[(i + j) % n] for j in range(-half, half + 1) if j) for i in range(n)}
