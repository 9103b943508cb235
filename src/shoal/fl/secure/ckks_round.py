"""``fl.secure: ckks``: a round's updates summed under CKKS, the server adding ciphertexts it cannot read.

The encryption is :mod:`shoal.fl.secure.ckks` (Cheon, Kim, Kim and Song 2017, through TenSEAL); this
file is the round around it. The clients share one secret context, the server holds the public one
(no secret key: it adds, it cannot decrypt). For a round with participants U:

1. ``setup``: the server sizes the CKKS parameters for |U| clients (``CkksParams.for_addition``) and
   names the hash of the global model every participant must have been sent.
2. Upload: each client of U still there checks the model's hash, encrypts its update (clipped to
   ``clip_range``, stochastically rounded to ``value_bits``) and sends the ciphertexts. The server
   checks each upload (:func:`ckks.check`) and leaves out, logging why, one it refuses.
3. Add: the server adds the accepted uploads with the public context; one whose ciphertexts do not
   load is found, logged and left out. A: whose uploads are in the sum.
4. Decrypt: the server sends the encrypted sum to one client of A still there (the lowest-numbered),
   which decrypts it and returns the float32 sum; the server checks its shape and range.

Dropouts (``drop_at``, in secagg's stage names): a client dropped at ``keys``, ``shares`` or
``masked`` is gone before its upload and sends nothing: the sum is over the clients that uploaded. One
dropped at ``unmask`` uploaded and then went: it is in the sum but cannot decrypt it. The round aborts,
saying why, when fewer than ``min_fraction`` of U are in A (the decrypting client learns the sum, which
is one client's update when A is one client) or when no client of A is left to decrypt.

Trust model: an honest-but-curious server that colludes with no client. The server sees ciphertexts
and the sum; every client holds the key that opens every upload, so a client that sees another's
ciphertext reads it (SecAgg+ hides updates from any minority of colluding clients; this does not).
Neither the server's sum nor the decrypting client's plaintext can be verified beyond its range. The
ciphertexts are not bound to the round or the model: over a network a replayed upload would add up,
which is one reason ``shoal fl server`` does not run this mechanism yet. The keys are made once per
mechanism (per CKKS parameter set) and handed out of band, so their bytes are not in a round's traffic.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal.fl import wire
from shoal.fl.secure import ckks, fixed_point
from shoal.fl.secure.secagg import Aggregate, Traffic, model_hash
from shoal.registry import SECURE

log = logging.getLogger("shoal.fl")


class CkksOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value_bits: int = Field(14, ge=2, le=24, description="bits of one coordinate's stochastically rounded "
                            "level; CKKS packs two 14-bit levels a slot at 15.6 bytes a parameter, 16 bits cost "
                            "about 17.5")
    clip_range: float = Field(0.5, gt=0, description="each coordinate of an update is clipped to [-clip_range, "
                              "clip_range] before it is quantised")
    public_key_encryption: bool = Field(False, description="clients encrypt with the public key rather than the "
                                        "shared secret one (4.7 times the noise, about 2 bits of every slot; lets "
                                        "a party without the secret key contribute)")
    min_fraction: float = Field(0.5, gt=0, le=1, description="the round aborts when fewer than this share of "
                                "the selected clients' uploads are in the sum")

    @model_validator(mode="after")
    def _tenseal_installed(self) -> "CkksOptions":
        # find_spec, not import: a config is checked in processes (shoal list, a gRPC client) that never
        # encrypt, and TenSEAL's import takes half a second. It raises ValueError for a module that
        # sys.modules holds as None (an import that was blocked).
        try:
            found = importlib.util.find_spec("tenseal") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ValueError("ckks needs TenSEAL, which is not installed: pip install -e '.[he]'")
        return self


@dataclass(frozen=True)
class CkksSetup:
    """What the server announces for a round: who takes part, on which model, under which parameters."""

    round: int
    participants: tuple[int, ...]
    numel: int
    model_hash: str
    params: ckks.CkksParams  # sized for len(participants)
    min_uploads: int


@SECURE.register("ckks", CkksOptions)
class Ckks:
    """CKKS through TenSEAL: clients encrypt their updates, the server adds ciphertexts, a client decrypts the sum."""

    # Skellam noise would need room in every slot beyond the clients' levels, which the exactness bound
    # of CkksParams does not size yet; FederationConfig refuses fl.privacy with it.
    distributed_noise = False
    runs_over_grpc = False  # simulation only: no gRPC stages, and uploads are not bound to the round

    def __init__(self, options: CkksOptions):
        self.options = options
        # (N, coeff_mod_bit_sizes) -> (secret context, public context): one key a parameter set, kept
        # across rounds (clients_per_round fixes it, so one key a run).
        self._contexts: dict[tuple[int, tuple[int, ...]], tuple[bytes, bytes]] = {}

    def setup(self, rnd: int, participants: list[int], weights: torch.Tensor, noise_std: float = 0.0) -> CkksSetup:
        if noise_std > 0:  # FederationConfig refuses fl.privacy with ckks before a run starts
            raise ValueError("ckks adds no distributed DP noise; fl.privacy needs fl.secure=secagg")
        o, parts = self.options, tuple(sorted(participants))
        params = ckks.CkksParams.for_addition(len(parts), value_bits=o.value_bits, clip_range=o.clip_range,
                                              public_key_encryption=o.public_key_encryption)
        return CkksSetup(round=rnd, participants=parts, numel=weights.numel(), model_hash=model_hash(weights),
                         params=params, min_uploads=max(1, math.ceil(o.min_fraction * len(parts))))

    def rounding_bound(self, numel: int) -> float:
        """How much stochastic rounding can add to an update's L2 norm: one step a coordinate, as SecAgg+'s."""
        return fixed_point.rounding_bound(numel, self.options.clip_range, self.options.value_bits)

    def contexts(self, params: ckks.CkksParams) -> tuple[bytes, bytes]:
        """(secret, public) contexts for ``params``: made on first use, then the same."""
        key = (params.poly_modulus_degree, params.coeff_mod_bit_sizes)
        if key not in self._contexts:
            self._contexts[key] = ckks.keygen(params)
        return self._contexts[key]

    def local_round(self, setup: CkksSetup, updates: dict[int, torch.Tensor], weights: torch.Tensor, *,
                    drop_at: dict[int, str]) -> tuple[Aggregate | None, str | None, Traffic]:
        """The whole round in this process (``shoal fl simulate``), every message through :mod:`shoal.fl.wire`.

        Traffic: a client's uplink is its ciphertexts (``masked_bytes``: all of them, accepted or not);
        the decrypting client's downlink is the encrypted sum and its uplink also holds the float32 sum
        it returns, which is all of ``overhead_bytes``."""
        secret, public = self.contexts(setup.params)
        traffic = Traffic()
        uploads = self._uploads(setup, updates, weights, drop_at, secret, public, traffic)
        summed, added = _add(setup, public, uploads)
        n = len(setup.participants)
        if len(added) < setup.min_uploads:
            return None, (f"round {setup.round}: only {len(added)} of {n} clients' uploads are in the sum; the "
                          f"round needs {setup.min_uploads}"), traffic
        holder = next((u for u in added if drop_at.get(u) != "unmask"), None)
        if holder is None:
            return None, f"round {setup.round}: every client in the sum dropped before decrypting it", traffic
        try:
            total = ckks.decrypt(secret, setup.params, _carry(summed, holder, traffic.downlink), setup.numel,
                                 len(added))
        except ValueError as err:
            return None, f"round {setup.round}: client {holder} could not decrypt the sum: {err}", traffic
        reply = _carry({"sum": total}, holder, traffic.uplink)
        try:
            total = _check_sum(setup, reply, len(added))
        except ValueError as err:
            return None, f"round {setup.round}: client {holder}'s decrypted sum refused: {err}", traffic
        return Aggregate(total, added, []), None, traffic

    def _uploads(self, setup: CkksSetup, updates: dict[int, torch.Tensor], weights: torch.Tensor,
                 drop_at: dict[int, str], secret: bytes, public: bytes,
                 traffic: Traffic) -> dict[int, dict[str, torch.Tensor]]:
        """Phase 2: the clients' encrypted updates as the server received and checked them."""
        if model_hash(weights) != setup.model_hash:
            log.warning("round %d: every client refuses: the model it was sent is not the setup's", setup.round)
            return {}
        for u in sorted(set(updates) - set(setup.participants)):
            log.warning("round %d: client %d is not a participant; its update is ignored", setup.round, u)
        key = public if setup.params.public_key_encryption else secret
        uploads = {}
        for u in setup.participants:
            if u not in updates or drop_at.get(u, "unmask") != "unmask":
                continue  # gone before its upload
            message = ckks.encrypt(key, setup.params, updates[u])
            traffic.masked_bytes += wire.payload_bytes(message)
            received = _carry(message, u, traffic.uplink)
            try:
                ckks.check(setup.params, received, setup.numel)
            except ValueError as err:
                log.warning("round %d: client %d's upload rejected: %s", setup.round, u, err)
                continue
            uploads[u] = received
        return uploads


def _add(setup: CkksSetup, public: bytes,
         uploads: dict[int, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor] | None, list[int]]:
    """Phase 3, the server's: the encrypted sum and whose uploads it holds. SEAL's loader refuses a bad
    ciphertext only when it meets it, so when the sum of all fails each upload is loaded alone to find
    the bad ones (a round with none pays nothing for that)."""
    if not uploads:
        return None, []
    try:
        return ckks.add(public, setup.params, list(uploads.values())), sorted(uploads)
    except ValueError:
        pass
    good = {}
    for u, upload in uploads.items():
        try:
            ckks.add(public, setup.params, [upload])
        except ValueError as err:
            log.warning("round %d: client %d's upload rejected: %s", setup.round, u, err)
            continue
        good[u] = upload
    return (ckks.add(public, setup.params, list(good.values())) if good else None), sorted(good)


def _check_sum(setup: CkksSetup, reply: dict[str, torch.Tensor], clients: int) -> torch.Tensor:
    """The server's check of the decrypting client's answer: one finite float32 vector in range."""
    total = reply.get("sum") if set(reply) == {"sum"} else None
    if not isinstance(total, torch.Tensor) or total.dtype != torch.float32 or tuple(total.shape) != (setup.numel,):
        raise ValueError(f"expected {{'sum': float32 of shape ({setup.numel},)}}, got "
                         f"{ {k: (v.dtype, tuple(v.shape)) for k, v in reply.items()} }")
    bound = clients * setup.params.clip_range * (1 + 1e-6)  # float32 rounding of the exact sum
    if not bool(torch.isfinite(total).all()) or float(total.abs().max()) > bound:
        raise ValueError(f"values outside [-{bound:g}, {bound:g}], the range of {clients} clipped updates")
    return total


def _carry(tensors: dict[str, torch.Tensor], client: int, book: dict[int, int]) -> dict[str, torch.Tensor]:
    """Send ``tensors`` through the wire format, counting their bytes to ``client`` in ``book``."""
    book[client] = book.get(client, 0) + wire.payload_bytes(tensors)
    return wire.unpack(wire.pack({}, tensors))[1]
