"""GPUs on nodes, and gang placement on them: all of a job's GPUs are allocated at once or none are.

A job of fewer GPUs than a node has goes on one node (the fullest one it fits on, so that whole nodes
stay free for large jobs); a job of a node's size or more takes whole free nodes (``ceil(gpus /
per_node)`` of them, its last one partly when the count does not divide). Free nodes are kept in
buckets by free count, so a placement looks at ``per_node`` buckets, not every node.
"""

from __future__ import annotations

import math

Allocation = tuple[tuple[int, int], ...]  # (node, GPUs on it)


class PlacementError(RuntimeError):
    """An allocation broke the gang invariant (a bug, never a user error)."""


class Cluster:
    """``gpus`` GPUs on nodes of ``per_node``; the last node holds the remainder."""

    def __init__(self, gpus: int, per_node: int = 8):
        if gpus < 1 or per_node < 1:
            raise ValueError(f"a cluster needs at least one GPU and one per node (got {gpus}, {per_node})")
        self.gpus, self.per_node = gpus, per_node
        sizes = [per_node] * (gpus // per_node) + ([gpus % per_node] if gpus % per_node else [])
        self.size = sizes
        self.free = list(sizes)
        self.buckets: list[set[int]] = [set() for _ in range(per_node + 1)]
        for node, free in enumerate(self.free):
            self.buckets[free].add(node)
        self.free_total = gpus
        self.held: dict[int, Allocation] = {}  # job id -> its allocation

    def fits(self, gpus: int) -> bool:
        return self._find(gpus) is not None

    def could_ever_fit(self, gpus: int) -> bool:
        """Whether the empty cluster could place it (a job that never can is refused up front)."""
        if gpus < self.per_node:
            return max(self.size) >= gpus
        return math.ceil(gpus / self.per_node) <= sum(1 for s in self.size if s == self.per_node)

    def fits_after(self, gpus: int, freed: dict[int, int]) -> bool:
        """Whether ``gpus`` would fit once the GPUs in ``freed`` (node -> count) were released."""
        if gpus < self.per_node:
            return any(self.free[node] + n >= gpus for node, n in freed.items())
        whole = len(self.buckets[self.per_node]) + sum(
            1 for node, n in freed.items() if self.free[node] < self.per_node == self.free[node] + n)
        return whole >= math.ceil(gpus / self.per_node)

    def allocate(self, job: int, gpus: int) -> Allocation | None:
        """Place ``gpus`` for ``job``, or None (nothing is held then)."""
        if job in self.held:
            raise PlacementError(f"job {job} already holds GPUs")
        alloc = self._find(gpus)
        if alloc is not None:
            self._take(alloc, -1)
            self.held[job] = alloc
        return alloc

    def release(self, job: int) -> Allocation:
        alloc = self.held.pop(job)
        self._take(alloc, +1)
        return alloc

    def restore(self, job: int, alloc: Allocation) -> None:
        """Give ``job`` back exactly ``alloc`` (undoing a tentative release)."""
        for node, n in alloc:
            if self.free[node] < n:
                raise PlacementError(f"node {node} has {self.free[node]} GPUs free, not {n}")
        self._take(alloc, -1)
        self.held[job] = alloc

    def check(self) -> None:
        """The gang invariant: each node's free and held GPUs add to its size, none negative."""
        used = [0] * len(self.size)
        for alloc in self.held.values():
            for node, n in alloc:
                used[node] += n
        for node, size in enumerate(self.size):
            if used[node] + self.free[node] != size or self.free[node] < 0:
                raise PlacementError(f"node {node}: {used[node]} held + {self.free[node]} free != {size}")
            if node not in self.buckets[self.free[node]]:
                raise PlacementError(f"node {node} is in the wrong free bucket")
        if self.free_total != sum(self.free):
            raise PlacementError("the free total drifted from the nodes' free GPUs")

    def _find(self, gpus: int) -> Allocation | None:
        if gpus > self.free_total or gpus < 1:
            return None
        if gpus < self.per_node:
            for free in range(gpus, self.per_node + 1):  # best fit: the fullest node it fits on
                if self.buckets[free]:
                    return ((min(self.buckets[free]), gpus),)
            return None
        whole = self.buckets[self.per_node]
        need = math.ceil(gpus / self.per_node)
        if len(whole) < need:
            return None
        nodes = sorted(whole)[:need]
        last = gpus - self.per_node * (need - 1)
        return tuple((node, self.per_node) for node in nodes[:-1]) + ((nodes[-1], last),)

    def _take(self, alloc: Allocation, sign: int) -> None:
        for node, n in alloc:
            self.buckets[self.free[node]].discard(node)
            self.free[node] += sign * n
            self.buckets[self.free[node]].add(node)
            self.free_total += sign * n
