"""The alpha-beta cost model of collectives: pure arithmetic, no torch.

A message of ``S`` bytes between two workers costs ``alpha + S / beta``
(latency plus bytes over bandwidth). The ring collectives gloo and NCCL use
on ``N`` workers then cost (Thakur et al. 2005, Patarasuk & Yuan 2009):

- all-reduce: ``2 (N-1) alpha + 2 (N-1)/N * S / beta`` (reduce-scatter, then all-gather)
- all-gather of ``S`` bytes from each: ``(N-1) alpha + (N-1) * S / beta``

:func:`fit_allreduce` inverts the first formula from two timed all-reduces,
so the model describes the link the job really has, whatever its shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """What one worker's link can do: seconds per message, bytes per second."""

    alpha_s: float
    beta_bytes_per_s: float

    @property
    def mbit_per_s(self) -> float:
        return self.beta_bytes_per_s * 8 / 1e6


def allreduce_s(nbytes: float, workers: int, link: Link, messages: int = 1) -> float:
    """Ring all-reduce of ``nbytes`` per worker, split into ``messages`` collectives."""
    if workers <= 1:
        return 0.0
    n = workers
    return messages * 2 * (n - 1) * link.alpha_s + 2 * (n - 1) / n * nbytes / link.beta_bytes_per_s


def allgather_s(nbytes: float, workers: int, link: Link, messages: int = 1) -> float:
    """Ring all-gather: every worker contributes ``nbytes`` and receives everyone's."""
    if workers <= 1:
        return 0.0
    n = workers
    return messages * (n - 1) * link.alpha_s + (n - 1) * nbytes / link.beta_bytes_per_s


def fit_allreduce(small_bytes: float, small_s: float, large_bytes: float, large_s: float, workers: int) -> Link:
    """The link that explains two measured all-reduce times.

    The slope between the two sizes gives the bandwidth, the small message's
    time what is left as latency. Timing noise can make the slope flat or
    negative; bandwidth is then bounded by the large message alone.
    """
    if workers <= 1:
        raise ValueError("a link is only measured between at least 2 workers")
    if large_bytes <= small_bytes:
        raise ValueError("the large probe must be larger than the small one")
    n = workers
    volume = 2 * (n - 1) / n
    slope = (large_s - small_s) / (large_bytes - small_bytes)  # seconds per byte of payload
    if slope <= 0:
        slope = large_s / large_bytes
    beta = volume / slope
    alpha = max(small_s - volume * small_bytes / beta, 0.0) / (2 * (n - 1))
    return Link(alpha_s=alpha, beta_bytes_per_s=beta)


@dataclass(frozen=True)
class CodecCost:
    """What one step costs with a codec, and how many steps it needs relative to fp32."""

    name: str
    compute_s: float  # forward + backward + optimizer step, no communication
    codec_s: float  # encode + decode of one step's gradient
    comm_s: float  # the collectives, from the link model
    step_factor: float  # steps to a target relative to uncompressed (>= 1 for lossy codecs)
    period: int = 1  # communication every this many steps (local SGD)

    @property
    def step_s(self) -> float:
        return self.compute_s + (self.codec_s + self.comm_s) / self.period

    @property
    def time_factor(self) -> float:
        """Predicted time to a target, in units of one uncompressed step (up to a constant)."""
        return self.step_factor * self.step_s


def comm_s(wire_bytes: float, summable: bool, workers: int, link: Link, messages: int = 1) -> float:
    """One step's collectives for a codec sending ``wire_bytes`` per worker."""
    if summable:
        return allreduce_s(wire_bytes, workers, link, messages)
    return allgather_s(wire_bytes, workers, link, messages)


def best(costs: list[CodecCost]) -> CodecCost:
    """The cheapest predicted time to target; ties go to the earlier (simpler) codec."""
    if not costs:
        raise ValueError("no codec to choose from")
    return min(costs, key=lambda c: c.time_factor)
