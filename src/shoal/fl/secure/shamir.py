"""Shamir's t-of-n secret sharing over the prime field GF(2**521 - 1).

A secret s < P is the constant term of a random polynomial f of degree t - 1;
the share of party x (an integer in [1, P)) is f(x). Any t shares give s back
by Lagrange interpolation at 0, fewer say nothing about it. Secure
aggregation shares 32-byte values (a self-mask seed, an X25519 private key),
so the field must hold 2**256: the Mersenne prime 2**521 - 1 does, and a
share takes :data:`SHARE_BYTES` bytes. Coefficients come from ``secrets``.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping

P = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: int, threshold: int, parties: list[int]) -> dict[int, int]:
    """The shares of ``secret`` for each party (a nonzero x), any ``threshold`` of which recover it."""
    if not 0 <= secret < P:
        raise ValueError("the secret must be in [0, P)")
    if not 1 <= threshold <= len(parties):
        raise ValueError(f"threshold {threshold} must be in [1, {len(parties)}] (the number of parties)")
    if len(set(parties)) != len(parties) or not all(0 < x < P for x in parties):
        raise ValueError("parties must be distinct integers in [1, P)")
    coefficients = [secret] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in parties}


def combine(shares: Mapping[int, int]) -> int:
    """The secret from shares {x: f(x)}; all of them are used, so pass exactly ``threshold`` of them."""
    return interpolate(shares, 0)


def interpolate(shares: Mapping[int, int], at: int) -> int:
    """f(at) for the polynomial of degree len(shares) - 1 through the shares."""
    xs = list(shares)
    total = 0
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * (at - xj) % P
                denominator = denominator * (xi - xj) % P
        total = (total + shares[xi] * numerator * pow(denominator, -1, P)) % P
    return total


def combine_checked(shares: Mapping[int, int], threshold: int, check: Callable[[int], bool],
                    max_tries: int = 256) -> tuple[int, list[int]] | None:
    """Recover a secret that ``check`` can verify, despite wrong shares among ``shares``.

    Tries ``threshold``-subsets (first the first ones) until a recovered secret passes
    ``check``; returns it with the parties whose share does not lie on its polynomial
    (forged or corrupted), or None when no subset tried passes (too few honest shares).
    """
    if len(shares) < threshold:
        return None
    parties = sorted(shares)
    for subset in itertools.islice(itertools.combinations(parties, threshold), max_tries):
        chosen = {x: shares[x] for x in subset}
        secret = combine(chosen)
        if check(secret):
            bad = [x for x in parties if x not in chosen and interpolate(chosen, x) != shares[x]]
            return secret, bad
    return None


def to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "little")


def from_bytes(raw: bytes) -> int:
    """A share or secret from its bytes; ValueError for one that is not a field element."""
    if len(raw) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "little")
    if value >= P:
        raise ValueError("a share must be below the field's prime")
    return value


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % P
    return result
