"""Homomorphic aggregation of federated updates with CKKS (TenSEAL).

Clients encrypt their update; the server adds ciphertexts without reading
them; only holders of the secret key decrypt the sum. CKKS (Cheon, Kim, Kim
and Song 2017, "Homomorphic Encryption for Arithmetic of Approximate
Numbers") through TenSEAL (Benaissa et al. 2021), addition only:

1. Clip each coordinate to [-r, r] and round it stochastically (unbiased) to
   an integer level z in [-L, L], L = 2**(q-1) - 1 for q = ``value_bits``,
   step r / L.
2. Pack k = ``values_per_slot`` levels into one real slot as signed digits
   of base 2**b, b = q + ceil(log2 n_max): P = sum_j z_j * 2**(b*j).
3. Encrypt the packed slots N/2 at a time, one ``ts.ckks_vector`` a chunk
   (never ``ckks_tensor``: one ciphertext a value, TenSEAL issue #429), and
   send each chunk's SEAL ciphertext as bytes in a uint8 tensor.
4. The server loads and adds the chunks of all uploads; no key is needed.
5. A key holder decrypts, rounds each slot to the nearest integer S, and
   reads the k digits back: the exact sum of the clients' levels, times the
   step.

Why that is exact (checked by :class:`CkksParams` on construction; a
parameter that breaks it is refused with a ``ValueError`` naming it):

- No carry: n clients' digits sum to at most n * L < 2**(b-1) in magnitude
  when n <= n_max, so every digit of S stays inside its field; read as
  centred residues they come back exactly. No guard bits are needed: that
  bound is worst case, and digits are read only from the rounded integer S.
- Rounding recovers S when the slot error is under 1/2. It has two parts.
  CKKS noise: per client and slot, variance N/2 * sigma**2 + N/24 (SEAL's
  error, sigma = 3.2, plus the encoder's rounding) in units of 1/scale, or
  N/2 * ((1 + 2N/3)/12 + sigma**2 (1 + 4N/3)/p**2) + N/24 with public-key
  encryption (the rounding of the switch off the special prime p dominates);
  independent per client, so a sum of n has sqrt(n) times the deviation;
  ``TAIL_SIGMAS`` = 10 deviations (a Gaussian tail of 1.5e-23 a slot, the
  noise being a sum of N small terms) over 2**scale_bits, plus the second
  part, must stay under 1/2. Float64: SEAL encodes and
  decodes through a double FFT, whose error grows with the slot's size;
  measured 3 * 2**(packed_bits - 53) for an encryption and decryption, it is
  bounded here by 8 * 2**(packed_bits - 53), and packed_bits = k * b is
  capped at ``MAX_PACKED_BITS`` = 46, which keeps it under 1/16.
- No wrap: every plaintext coefficient, at most scale * max|S| plus the
  clients' coefficient noise, stays under Q/2 for the product Q of the data
  primes (SEAL's primes, recomputed here exactly). The last prime, the
  special one, never reaches a ciphertext: it is there because TenSEAL
  makes relinearisation keys with every context; no relinearisation or
  Galois key leaves ``keygen``.

The bytes: a ciphertext is two polynomials of N coefficients per data prime,
8 bytes each before SEAL's zstd, for N/2 slots, so a slot costs 4 * 8 bytes
per data prime and a parameter that over k. ``CkksParams.for_addition``
picks, for given ``value_bits`` and n_max, the k, N, scale and primes with
the fewest bytes a parameter. For q = 14 and n_max = 100: N = 4096, one
57-bit data prime, scale 2**15, k = 2; 15.6 bytes a parameter for 185,000
values (16.4 for 50,000: the last chunk is padded) against 82.4 for
TenSEAL's default use (N = 8192, [60, 40, 40, 60], scale 2**40, one float a
slot). The price is q: a 100-client sum of N(0, 0.01**2) updates clipped at
0.06 is off the float sum by 3e-4 (relative L2), all of it stochastic
rounding; q = 16 brings that to 7e-5 at 17.5 bytes (two 31-bit primes). For
such updates no setting of this scheme has both 16 bytes and 1e-4 at
n_max = 100: float64 caps a slot at 46 useful bits, each value needs q + 7
of them, and a slot costs about 31 bytes. ``measure()`` gives the figures.

Who holds the keys: ``keygen`` makes one secret context that the clients
share (as NVFlare's clients do); the server gets the public context, which
has no secret key: it can add but not decrypt. With the default symmetric
encryption the clients encrypt with the secret key (4.7 times less noise
than public-key encryption, about 2 bits of every slot) and the public
context holds no key at all; ``public_key_encryption=True`` lets a party
with the public context encrypt too. A threshold or multi-key variant, in
which no single party can decrypt, is not built. Nor is the server's
honesty checked: it could add anything to the sum it returns.

Bytes from the network are hostile: :func:`check` bounds the chunk count
and sizes before TenSEAL sees them; the TenSEAL framing is rebuilt from
trusted values, so only SEAL's own validated loader reads peer bytes; a
loaded chunk must be a size-2 ciphertext at the context's level and scale.
A ciphertext under another key of the same parameters cannot be told apart
until decryption, where its sum falls outside the possible range.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shoal.fl.wire import payload_bytes

# SEAL's largest total coefficient modulus for 128-bit security, by N.
MAX_MODULUS_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60
SIGMA = 3.2  # SEAL's error standard deviation; samples are clipped at 6 sigma
TAIL_SIGMAS = 10.0
MAX_PACKED_BITS = 46
FP_ERROR_FACTOR = 8.0
# Room a SEAL ciphertext takes beyond its coefficients (header, parms_id, sizes).
SEAL_OVERHEAD_BYTES = 512


class TensealMissing(ImportError):
    """TenSEAL, the optional dependency of homomorphic aggregation, is not installed."""


def _tenseal() -> Any:
    try:
        import tenseal
        import tenseal.sealapi  # noqa: F401  registers the types coeff_modulus() returns
    except ImportError as e:
        raise TensealMissing(f"homomorphic aggregation needs TenSEAL: pip install -e '.[he]' ({e})") from e
    return tenseal


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters and the packing of quantised values into slots; see the module docstring."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    value_bits: int
    clip_range: float
    max_clients: int
    values_per_slot: int = 1
    public_key_encryption: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in MAX_MODULUS_BITS:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS)}, got {n}")
        if len(bits) < 2 or not all(_is_int(b) and 2 <= b <= MAX_PRIME_BITS for b in bits):
            raise ValueError(f"coeff_mod_bit_sizes must be at least two sizes of 2..{MAX_PRIME_BITS} bits "
                             f"(the last one is the special prime), got {bits}")
        if sum(bits) > MAX_MODULUS_BITS[n]:
            raise ValueError(f"coeff_mod_bit_sizes total {sum(bits)} bits, over the {MAX_MODULUS_BITS[n]} that "
                             f"poly_modulus_degree={n} allows for 128-bit security")
        for name, low in (("scale_bits", 1), ("value_bits", 2), ("max_clients", 1), ("values_per_slot", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        clip = self.clip_range
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip_range must be a positive finite number, got {self.clip_range!r}")
        if self.packed_bits > MAX_PACKED_BITS:
            raise ValueError(f"values_per_slot={self.values_per_slot} fields of {self.field_bits} bits "
                             f"(value_bits={self.value_bits} + {self.field_bits - self.value_bits} for "
                             f"max_clients={self.max_clients}) pack {self.packed_bits} bits into a slot; "
                             f"float64 encoding keeps {MAX_PACKED_BITS}")
        self.primes  # raises ValueError if SEAL would find no such primes
        error = self.error_bound(self.max_clients)
        if error >= 0.5:
            raise ValueError(f"scale_bits={self.scale_bits} is too small for {self.max_clients} clients: the "
                             f"slot error bound is {error:.3f} of a unit, it must stay under 0.5")
        if self.max_coefficient >= math.prod(self.primes[:-1]) // 2:
            raise ValueError(f"coeff_mod_bit_sizes {bits}: data primes of {sum(bits[:-1])} bits cannot hold "
                             f"scale_bits={self.scale_bits} + {self.packed_bits} packed bits without wrapping")

    @classmethod
    def for_addition(cls, max_clients: int, *, value_bits: int = 14, clip_range: float,
                     public_key_encryption: bool = False) -> CkksParams:
        """The sound parameters with the fewest wire bytes a parameter for sums of up to ``max_clients``.

        Over N and k, fewest data primes a packed value first (each costs 32 bytes a slot before
        zstd), then fewest data-prime bits a value (zstd squeezes the unused high bits), then smaller N.
        """
        for name, value, low in (("max_clients", max_clients, 1), ("value_bits", value_bits, 2)):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        field = value_bits + _bits_for(max_clients)
        best: tuple[tuple[float, float, int], CkksParams] | None = None
        for n in MAX_MODULUS_BITS:
            for k in range(1, MAX_PACKED_BITS // field + 1):
                params = _smallest_for(n, k, max_clients, value_bits, clip_range, public_key_encryption)
                if params is not None:
                    data = params.coeff_mod_bit_sizes[:-1]
                    key = (len(data) / k, sum(data) / k, n)
                    if best is None or key < best[0]:
                        best = (key, params)
        if best is None:
            raise ValueError(f"no sound CKKS parameters for value_bits={value_bits}, max_clients={max_clients}")
        return best[1]

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """L: the largest level magnitude."""
        return 2 ** (self.value_bits - 1) - 1

    @property
    def step(self) -> float:
        return self.clip_range / self.levels

    @property
    def field_bits(self) -> int:
        return self.value_bits + _bits_for(self.max_clients)

    @property
    def packed_bits(self) -> int:
        return self.field_bits * self.values_per_slot

    @functools.cached_property
    def primes(self) -> tuple[int, ...]:
        return _seal_primes(self.poly_modulus_degree, self.coeff_mod_bit_sizes)

    def max_packed(self, clients: int) -> int:
        """The largest |S| a sum of ``clients`` packed slots can reach."""
        field = 2 ** self.field_bits
        return clients * self.levels * (field ** self.values_per_slot - 1) // (field - 1)

    @property
    def max_coefficient(self) -> int:
        """A bound on a summed plaintext coefficient: scale * max|S| plus every client's coefficient noise."""
        noise = _coefficient_noise(self.poly_modulus_degree, self.max_clients, self.public_key_encryption)
        return 2**self.scale_bits * self.max_packed(self.max_clients) + noise

    def error_bound(self, clients: int) -> float:
        """A bound on a decrypted slot's error, in units of S, for a sum of ``clients``; exact below 1/2."""
        return _error_bound(self.poly_modulus_degree, self.scale_bits, self.packed_bits, clients,
                            self.public_key_encryption, self.primes[-1])

    def chunks(self, numel: int) -> int:
        """Ciphertexts an update of ``numel`` values takes."""
        return -(-numel // (self.slots * self.values_per_slot))

    @property
    def ciphertext_bytes(self) -> tuple[int, int]:
        """(least, most) bytes of one serialised chunk: at least one polynomial's entropy (a seeded
        ciphertext), at most two uncompressed polynomials."""
        n, data = self.poly_modulus_degree, self.coeff_mod_bit_sizes[:-1]
        return n * sum(b - 1 for b in data) // 8, 2 * n * len(data) * 8 + SEAL_OVERHEAD_BYTES


def keygen(params: CkksParams) -> tuple[bytes, bytes]:
    """``(secret_context, public_context)``: the first for the clients, the second for the server."""
    ts = _tenseal()
    kind = ts.ENCRYPTION_TYPE.ASYMMETRIC if params.public_key_encryption else ts.ENCRYPTION_TYPE.SYMMETRIC
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), encryption_type=kind)
    if _context_primes(ctx)[1:] != params.primes:
        raise RuntimeError(f"SEAL chose primes {_context_primes(ctx)[1:]}, the bound assumed {params.primes}")
    keep = dict(save_public_key=params.public_key_encryption, save_galois_keys=False, save_relin_keys=False)
    return ctx.serialize(save_secret_key=True, **keep), ctx.serialize(save_secret_key=False, **keep)


def holds_secret_key(context: bytes, params: CkksParams) -> bool:
    """Whether a serialised context for ``params`` holds the secret key; ValueError if it is not one for them."""
    return bool(_load_context(_tenseal(), context, params, secret=False).is_private())


def quantize(params: CkksParams, update: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The update's levels in [-L, L] (int64), clipped and stochastically rounded."""
    if not isinstance(update, torch.Tensor) or update.dtype != torch.float32 or update.dim() != 1:
        raise ValueError(f"update must be a 1-D float32 tensor, got {_describe(update)}")
    if update.numel() == 0 or not bool(torch.isfinite(update).all()):
        raise ValueError("update must be non-empty and finite")
    if generator is None:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    x = (update.detach().to(torch.float64).clamp(-params.clip_range, params.clip_range) / params.step).numpy()
    # numpy's floor: torch's rounding ops wake its OpenMP threads even for a few thousand values,
    # 8 ms a call on a busy two-core host against microseconds.
    low = np.floor(x)
    up = torch.rand(x.shape, dtype=torch.float64, generator=generator).numpy() < (x - low)
    # r / step can round to a hair over L, which would round up to L + 1 now and then.
    return torch.from_numpy(np.clip((low + up).astype(np.int64), -params.levels, params.levels))


def encrypt(context: bytes, params: CkksParams, update: torch.Tensor, *,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The update quantised, packed and encrypted: ``{"ct": uint8, "ct_sizes": int64}`` for the wire.

    ``context`` is the secret one, or the public one with ``public_key_encryption``; rounding draws
    from ``generator`` (default: OS entropy).
    """
    ts = _tenseal()
    ctx = _load_context(ts, context, params, secret=not params.public_key_encryption)
    packed = _pack(params, quantize(params, update, generator=generator))
    return _to_wire([_seal_bytes(ts.ckks_vector(ctx, row.tolist()).serialize()) for row in packed])


def check(params: CkksParams, tensors: dict[str, torch.Tensor], numel: int) -> None:
    """Raise ``ValueError`` saying what is wrong if ``tensors`` cannot be an encrypted update of ``numel``."""
    if not _is_int(numel) or numel < 1:
        raise ValueError(f"numel must be a positive integer, got {numel!r}")
    _sizes(params, tensors, params.chunks(numel))


def add(public_context: bytes, params: CkksParams, uploads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The sum of the uploads, still encrypted. Each must have passed :func:`check`; they must agree."""
    if not isinstance(uploads, list) or not 1 <= len(uploads) <= params.max_clients:
        raise ValueError(f"uploads must be a list of 1..{params.max_clients} (max_clients), "
                         f"got {len(uploads) if isinstance(uploads, list) else type(uploads).__name__}")
    ts = _tenseal()
    ctx = _load_context(ts, public_context, params, secret=False)
    blobs = [_split(params, upload, f"upload {i}: ") for i, upload in enumerate(uploads)]
    for i, chunks in enumerate(blobs):
        if len(chunks) != len(blobs[0]):
            raise ValueError(f"upload {i} has {len(chunks)} chunks, upload 0 has {len(blobs[0])}")
    summed = []
    for c in range(len(blobs[0])):
        total = _load_chunk(ts, ctx, params, blobs[0][c], f"upload 0, chunk {c}")
        for i in range(1, len(blobs)):
            total += _load_chunk(ts, ctx, params, blobs[i][c], f"upload {i}, chunk {c}")
        summed.append(_seal_bytes(total.serialize()))
    return _to_wire(summed)


def decrypt(secret_context: bytes, params: CkksParams, summed: dict[str, torch.Tensor], numel: int,
            clients: int) -> torch.Tensor:
    """The float32 sum of ``clients`` clients' quantised updates, from :func:`add`'s output."""
    if not _is_int(clients) or not 1 <= clients <= params.max_clients:
        raise ValueError(f"clients must be 1..{params.max_clients} (max_clients), got {clients!r}")
    slots = _decrypt_slots(secret_context, params, summed, numel)
    exact = torch.from_numpy(np.rint(slots.numpy()))  # numpy for the reason quantize gives
    if not bool((exact.abs() <= params.max_packed(clients)).all()):
        raise ValueError(f"decrypted sum is out of range for {clients} clients: a wrong secret context, "
                         "more clients than that, or a corrupt ciphertext")
    levels = _unpack(params, exact.to(torch.int64))
    if not bool((levels.abs() <= clients * params.levels).all()):
        raise ValueError(f"decrypted levels are out of range for {clients} clients: a corrupt ciphertext")
    return (levels[:numel].to(torch.float64) * params.step).to(torch.float32)


def wire_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the encrypted update takes in a message (the JSON header aside)."""
    return payload_bytes(tensors)


def measure(*, numel: int = 185_000, add_clients: int = 10, sum_clients: int = 100, sum_numel: int = 20_000,
            repeats: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """Wire bytes, speed and error of packed CKKS (value_bits 14 and 16) against TenSEAL's default use.

    Bytes a parameter, client encryption (values/s) and decryption (s) for ``numel`` values, server
    addition of ``add_clients`` uploads (values x clients / s): medians of ``repeats``. Relative L2
    error of a ``sum_clients`` sum of ``sum_numel`` values against the float64 sum, for N(0, 0.01**2)
    updates (clip 0.06) and for ones whose first 8 coordinates are 0.3 more (clip 0.35)::

        .venv/bin/python -c "from shoal.fl.secure.ckks import measure; print(measure())"
    """
    gen = torch.Generator().manual_seed(seed)
    gauss = [torch.randn(sum_numel, generator=gen) * 0.01 for _ in range(sum_clients)]
    large = [u.clone() for u in gauss]
    for u in large:
        u[:8] += 0.3
    results = {}
    for name, scheme in (("packed_q14", _packed), ("packed_q16", _packed), ("tenseal_default", _tenseal_default)):
        bits = 16 if name == "packed_q16" else 14
        enc, add_, dec = scheme(CkksParams.for_addition(sum_clients, value_bits=bits, clip_range=0.06))
        update = torch.randn(numel, generator=gen) * 0.01
        enc_s, wire = _median_time(lambda: enc(update), repeats)
        add_s, summed = _median_time(lambda: add_([wire] * add_clients), repeats)
        dec_s, _ = _median_time(lambda: dec(summed, numel, add_clients), repeats)
        row = {"bytes_per_param": wire_bytes(wire) / numel, "encrypt_values_per_s": numel / enc_s,
               "add_values_clients_per_s": numel * add_clients / add_s, "decrypt_s": dec_s}
        for label, updates, clip in (("gaussian", gauss, 0.06), ("large_coords", large, 0.35)):
            enc, add_, dec = scheme(CkksParams.for_addition(sum_clients, value_bits=bits, clip_range=clip))
            total = dec(add_([enc(u) for u in updates]), sum_numel, sum_clients).double()
            plain = torch.stack(updates).double().sum(0)
            row[f"rel_error_{label}"] = float((total - plain).norm() / plain.norm())
        results[name] = row
    return results


def _median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def _packed(params: CkksParams) -> tuple[Any, Any, Any]:
    secret, public = keygen(params)
    return (lambda u: encrypt(secret, params, u), lambda ups: add(public, params, ups),
            lambda s, numel, clients: decrypt(secret, params, s, numel, clients))


def _tenseal_default(_: CkksParams) -> tuple[Any, Any, Any]:
    """TenSEAL's tutorial use: N = 8192, [60, 40, 40, 60], scale 2**40, public-key encryption, one
    float a slot, the whole CKKSVector serialised; same chunking and wire tensors as the packed path."""
    ts = _tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2.0**40
    secret = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    public = ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)

    def encrypt_(update: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = ts.context_from(public)
        ctx.global_scale = 2.0**40
        values = update.double().tolist()
        return _to_wire([ts.ckks_vector(ctx, values[i:i + 4096]).serialize() for i in range(0, len(values), 4096)])

    def add_(uploads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ctx, chunks = ts.context_from(public), [_raw_chunks(u) for u in uploads]
        sums = []
        for c in range(len(chunks[0])):
            total = ts.ckks_vector_from(ctx, chunks[0][c])
            for other in chunks[1:]:
                total += ts.ckks_vector_from(ctx, other[c])
            sums.append(total.serialize())
        return _to_wire(sums)

    def decrypt_(summed: dict[str, torch.Tensor], numel: int, clients: int) -> torch.Tensor:
        ctx = ts.context_from(secret)
        values = [x for blob in _raw_chunks(summed) for x in ts.ckks_vector_from(ctx, blob).decrypt()]
        return torch.tensor(values[:numel], dtype=torch.float32)

    return encrypt_, add_, decrypt_


def _raw_chunks(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    raw, offsets = tensors["ct"].numpy().tobytes(), [0]
    for size in tensors["ct_sizes"].tolist():
        offsets.append(offsets[-1] + size)
    return [raw[a:b] for a, b in zip(offsets, offsets[1:])]


def _decrypt_slots(secret_context: bytes, params: CkksParams, summed: dict[str, torch.Tensor],
                   numel: int) -> torch.Tensor:
    check(params, summed, numel)
    ts = _tenseal()
    ctx = _load_context(ts, secret_context, params, secret=True)
    chunks = _split(params, summed, "")
    rows = [_load_chunk(ts, ctx, params, blob, f"chunk {c}").decrypt() for c, blob in enumerate(chunks)]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1)


def _pack(params: CkksParams, levels: torch.Tensor) -> torch.Tensor:
    """Float64 slots (chunks x N/2); |P| < 2**(packed_bits - 1) is exact in int64 and in float64."""
    k, chunks = params.values_per_slot, params.chunks(levels.numel())
    padded = torch.zeros(chunks * params.slots * k, dtype=torch.int64)
    padded[:levels.numel()] = levels
    weights = 2 ** (params.field_bits * torch.arange(k, dtype=torch.int64))
    return (padded.view(-1, k) * weights).sum(1).to(torch.float64).view(chunks, params.slots)


def _unpack(params: CkksParams, packed: torch.Tensor) -> torch.Tensor:
    """Signed base-2**b digits of each slot, low digit first: the inverse of :func:`_pack`."""
    b, digits = params.field_bits, []
    half, mask = 1 << (b - 1), (1 << b) - 1
    for _ in range(params.values_per_slot):
        digit = ((packed + half) & mask) - half
        digits.append(digit)
        packed = (packed - digit) >> b
    return torch.stack(digits, 1).reshape(-1)


def _to_wire(blobs: list[bytes]) -> dict[str, torch.Tensor]:
    ct = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return {"ct": ct, "ct_sizes": torch.tensor([len(b) for b in blobs], dtype=torch.int64)}


def _sizes(params: CkksParams, tensors: Any, chunks: int | None = None) -> list[int]:
    if not isinstance(tensors, dict) or set(tensors) != {"ct", "ct_sizes"}:
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise ValueError(f'an encrypted update is {{"ct", "ct_sizes"}}, got {keys}')
    ct, sizes = tensors["ct"], tensors["ct_sizes"]
    for name, t, dtype in (("ct", ct, torch.uint8), ("ct_sizes", sizes, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {_describe(t)}")
    if chunks is not None and sizes.numel() != chunks:
        raise ValueError(f"{sizes.numel()} chunks, but the update's values take {chunks}")
    low, high = params.ciphertext_bytes
    bad = ((sizes < low) | (sizes > high)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"chunk {i} is {int(sizes[i])} bytes; a ciphertext at these parameters takes {low}..{high}")
    if int(sizes.sum()) != ct.numel():
        raise ValueError(f"ct_sizes add up to {int(sizes.sum())} bytes, ct has {ct.numel()}")
    return sizes.tolist()


def _split(params: CkksParams, tensors: dict[str, torch.Tensor], where: str) -> list[bytes]:
    try:
        sizes = _sizes(params, tensors)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    return _raw_chunks(tensors)


def _load_context(ts: Any, blob: bytes, params: CkksParams, *, secret: bool) -> Any:
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"a context is bytes from keygen, got {type(blob).__name__}")
    try:
        ctx = ts.context_from(bytes(blob))
    except Exception as e:  # TenSEAL raises RuntimeError, ValueError or its protobuf errors
        raise ValueError(f"not a TenSEAL context: {e}") from None
    if _context_primes(ctx) != (params.poly_modulus_degree, *params.primes):
        raise ValueError("the context's poly_modulus_degree or coeff_mod_bit_sizes are not the params'")
    if secret and not ctx.is_private():
        raise ValueError("this needs the secret context (from keygen); the public one holds no secret key")
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def _load_chunk(ts: Any, ctx: Any, params: CkksParams, blob: bytes, where: str) -> Any:
    try:
        vector = ts.ckks_vector_from(ctx, _tenseal_proto(params, blob))
    except Exception as e:  # SEAL refuses bad headers, sizes and parameters with RuntimeError or ValueError
        raise ValueError(f"{where}: not a ciphertext for this context: {e}") from None
    (ct,) = vector.ciphertext()
    if ct.size() != 2 or ct.parms_id() != ctx.data.seal_context().first_parms_id() or not ct.is_ntt_form():
        raise ValueError(f"{where}: a ciphertext of {ct.size()} polynomials or at another level; a fresh "
                         "encryption or a sum of them has 2 at the first level")
    if ct.scale != 2.0**params.scale_bits:
        raise ValueError(f"{where}: ciphertext scale {ct.scale}, expected 2**{params.scale_bits}")
    return vector


def _context_primes(ctx: Any) -> tuple[int, ...]:
    """(N, *primes) of a TenSEAL context."""
    parms = ctx.data.seal_context().key_context_data().parms()
    return (parms.poly_modulus_degree(), *(m.value() for m in parms.coeff_modulus()))


# TenSEAL frames a CKKSVector as protobuf: field 1 the chunk sizes (packed
# uint32), field 2 the SEAL ciphertexts, field 3 the scale (double). Only
# field 2 travels; the server rebuilds the rest from the params it trusts.
def _seal_bytes(proto: bytes) -> bytes:
    i, found = 0, []
    while i < len(proto):
        key, i = _read_varint(proto, i)
        if key & 7 == 2:
            length, i = _read_varint(proto, i)
            if key >> 3 == 2:
                found.append(proto[i:i + length])
            i += length
        elif key & 7 == 1:
            i += 8
        else:
            raise RuntimeError(f"unexpected protobuf field {key >> 3} in TenSEAL's output")
    if len(found) != 1:
        raise RuntimeError(f"TenSEAL's output holds {len(found)} ciphertexts, expected 1")
    return found[0]


def _tenseal_proto(params: CkksParams, seal: bytes) -> bytes:
    sizes = _varint(params.slots)
    return (b"\x0a" + _varint(len(sizes)) + sizes + b"\x12" + _varint(len(seal)) + seal
            + b"\x19" + struct.pack("<d", 2.0**params.scale_bits))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def _smallest_for(n: int, k: int, max_clients: int, value_bits: int, clip_range: float,
                  public_key: bool) -> CkksParams | None:
    """The sound parameters with the fewest data-prime bits for N = n and k values a slot, or None."""
    field = value_bits + _bits_for(max_clients)
    packed = k * field
    most = max_clients * (2 ** (value_bits - 1) - 1) * (2 ** packed - 1) // (2**field - 1)
    for data_bits in range(packed + 2, MAX_MODULUS_BITS[n]):
        count = -(-data_bits // MAX_PRIME_BITS)
        sizes = (*(data_bits // count + (i < data_bits % count) for i in range(count)),
                 min(MAX_PRIME_BITS, MAX_MODULUS_BITS[n] - data_bits))
        try:
            primes = _seal_primes(n, sizes)
        except ValueError:
            continue
        need = next((s for s in range(1, 2 * MAX_PRIME_BITS)
                     if _error_bound(n, s, packed, max_clients, public_key, primes[-1]) < 0.5), None)
        room = (math.prod(primes[:-1]) // 2 - _coefficient_noise(n, max_clients, public_key) - 1) // most
        if need is not None and room > 0 and need <= room.bit_length() - 1:
            try:
                return CkksParams(n, sizes, need, value_bits, clip_range, max_clients, k, public_key)
            except ValueError:
                continue
    return None


def _error_bound(n: int, scale_bits: int, packed_bits: int, clients: int, public_key: bool,
                 special_prime: int) -> float:
    if public_key:
        variance = n / 2 * ((1 + 2 * n / 3) / 12 + SIGMA**2 * (1 + 4 * n / 3) / special_prime**2) + n / 24
    else:
        variance = n / 2 * SIGMA**2 + n / 24
    noise = TAIL_SIGMAS * math.sqrt(clients * variance) / 2**scale_bits
    return noise + FP_ERROR_FACTOR * 2.0 ** (packed_bits - 53)


def _coefficient_noise(n: int, clients: int, public_key: bool) -> int:
    """A bound on the summed noise in one plaintext coefficient: SEAL clips its error at 6 sigma; the
    switch off the special prime leaves at most (1 + N)/2; the encoder rounds by 1/2."""
    return math.ceil(clients * ((n + 1) / 2 + 1 if public_key else 6 * SIGMA + 1))


@functools.lru_cache(maxsize=64)
def _seal_primes(n: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL's ``CoeffModulus::Create`` picks: for each size, the largest primes below
    2**bits that are 1 mod 2N, handed out smallest first."""
    table = {}
    for bits in set(bit_sizes):
        want, found, value = bit_sizes.count(bits), [], 2**bits - 2 * n + 1
        while want and value > 2 ** (bits - 1):
            if _is_prime(value):
                found.append(value)
                want -= 1
            value -= 2 * n
        if want:
            raise ValueError(f"coeff_mod_bit_sizes: no {bit_sizes.count(bits)} primes of {bits} bits are 1 mod {2 * n}")
        table[bits] = found
    return tuple(table[bits].pop() for bits in bit_sizes)


def _is_prime(n: int) -> bool:
    """Miller-Rabin with the first 12 primes as bases: deterministic below 3.3e24."""
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2 or any(n % p == 0 for p in small):
        return n in small
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _bits_for(clients: int) -> int:
    return max(clients - 1, 0).bit_length()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__
