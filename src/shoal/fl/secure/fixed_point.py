"""Fixed-point codes for secure aggregation: what a client's float update
becomes before it is masked, and how the server reads the sum.

Each coordinate is clipped to [-r, r] and scaled to integer levels in
[-L, L], L = 2**(v-1) - 1 for v value bits (step r / L), with stochastic
rounding, so a code is an unbiased estimate of the clipped value. Codes are
residues modulo 2**b: the sum of n codes (and of the noise distributed DP
adds) stays inside (-2**(b-1), 2**(b-1)) when

    b = ceil(log2(2 * (n * L + 8 * sigma) + 1)),  sigma = std of the summed noise,

(the noise's tail past 8 sigma has probability below 1e-15 a coordinate),
so reading the sum back as a centred residue and multiplying by the step
gives the exact sum of the codes. Residues are computed modulo 2**32 in
uint32 (wrapping) and cut to b bits only on the wire: 2**b divides 2**32.

Distributed DP draws each client's share of the noise as Skellam
(Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning"): Poisson(mu/2) - Poisson(mu/2), variance mu, in
integer levels, so sums of shares are Skellam again and no one holds more
than their own share of the total.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_BITS = 32
TAIL_SIGMAS = 8.0


def levels(value_bits: int) -> int:
    """L: the largest code magnitude at ``value_bits`` bits."""
    return 2 ** (value_bits - 1) - 1


def wire_bits(value_bits: int, clients: int, noise_std_levels: float = 0.0) -> int:
    """b: the bits of a residue so that ``clients`` codes and their summed noise never wrap."""
    bound = clients * levels(value_bits) + TAIL_SIGMAS * noise_std_levels
    b = math.ceil(math.log2(2 * bound + 1))
    if b > MAX_BITS:
        raise ValueError(f"{clients} clients of {value_bits}-bit values with noise std {noise_std_levels:.3g} "
                         f"levels need {b} bits, over {MAX_BITS}: lower bits or the noise")
    return b


def encode(update: torch.Tensor, clip_range: float, value_bits: int, rng: np.random.Generator) -> np.ndarray:
    """The update's codes in [-L, L] as int64, stochastically rounded (numpy: on a busy host torch's
    element-wise kernels on a few hundred thousand values cost more in thread hand-offs than in work)."""
    scale = levels(value_bits) / clip_range
    x = np.clip(update.detach().reshape(-1).to(torch.float64).numpy(), -clip_range, clip_range) * scale
    low = np.floor(x)
    return (low + (rng.random(x.size) < (x - low))).astype(np.int64)


def skellam(numel: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of the given variance (in levels), int64."""
    if variance <= 0:
        return np.zeros(numel, dtype=np.int64)
    half = variance / 2
    return rng.poisson(half, numel).astype(np.int64) - rng.poisson(half, numel).astype(np.int64)


def to_residues(codes: np.ndarray) -> np.ndarray:
    """int64 codes -> uint32 residues modulo 2**32 (two's complement)."""
    return (codes & 0xFFFFFFFF).astype(np.uint32)


def decode_sum(residues: np.ndarray, bits: int, clip_range: float, value_bits: int) -> torch.Tensor:
    """The float sum from residues of the summed codes modulo 2**bits."""
    modulus = 1 << bits
    s = (residues.astype(np.int64) & (modulus - 1))
    s = np.where(s >= modulus // 2, s - modulus, s)
    return torch.from_numpy(s.astype(np.float64) * (clip_range / levels(value_bits))).float()


def rounding_bound(numel: int, clip_range: float, value_bits: int) -> float:
    """How far rounding can move an update in L2 at most: one step a coordinate, step * sqrt(d)."""
    return clip_range / levels(value_bits) * math.sqrt(numel)
