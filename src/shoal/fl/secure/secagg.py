"""SecAgg+: the server learns the sum of the clients' updates and nothing else.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS), with the neighbourhoods of Bell et al. 2020
(:mod:`~shoal.fl.secure.neighbours`). The server relays every message; the
clients never talk to each other directly. For a round with participants U
and the graph N (each client u has k neighbours N(u)):

1. ``keys``: u sends two X25519 public keys, c (to encrypt shares) and s (to
   agree masks). U1: who sent them.
2. ``shares``: u gets its neighbours' keys, draws a self-mask seed b_u and
   splits b_u and its private s key t-of-|N(u)| with Shamir
   (:mod:`~shoal.fl.secure.shamir`), encrypts each neighbour's pair of
   shares with AES-GCM under a key from X25519(c_u, c_v) through HKDF, and
   sends them with a SHA-256 commitment to b_u. U2: who sent them.
3. ``masked``: u gets the shares addressed to it (one that fails to decrypt
   ends u's part in the round: the sender saw another model or forged it),
   turns its update into fixed-point residues (:mod:`~shoal.fl.secure.
   fixed_point`, with its share of distributed-DP noise), and adds
   PRG(b_u) and, for each neighbour v in U2, +PRG(s_uv) if u < v else
   -PRG(s_uv), s_uv = HKDF(X25519(s_u, s_v)), modulo 2**32 (cut to b bits
   on the wire). U3: who sent a masked input.
4. ``unmask``: each survivor gets which neighbours sent inputs (U3) and which
   shared but did not (U2 \\ U3), and returns its share of b for the first
   and of s for the second; never both for one client (it checks, and it
   answers once). The server recovers each b_u of U3 (checked against its
   commitment) and each s key of U2 \\ U3 (checked against the public key
   it advertised), removes those self masks and the dropped clients' pairwise
   masks with the survivors, and what is left is the sum over U3.

The PRG is ChaCha20 keyed with 256 bits. Every derived key binds the round
and the hash of the global model the round carries, so a client the server
sent another model computes masks and share keys nobody else does: its
neighbours cannot decrypt its shares and refuse the round, and its input
never unmasks. A round aborts, saying why, when fewer than ``min_survivors``
clients remain at any stage, or when a client's self mask (or a dropped
client's key) has fewer than t honest shares among the answers. Wrong
shares beyond those needed are found by the checks and reported as forged.

Trust model: an honest-but-curious server (it follows the protocol and
tries to learn from what it sees) and honest-but-curious clients, any of
which may drop at any point. The server relays but cannot read the shares;
it could still lie about who dropped to learn one client's input, which is
what t > k/2 and each client's "never both shares" rule stop. A malicious
server could still make a round of one honest client among clients it runs
itself (Sybils); client identities bound to tokens and certificates are the
defence against that, not this protocol.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.comm.bitpack import pack_wide, unpack_wide, wide_bytes
from shoal.fl.secure import fixed_point, neighbours, shamir
from shoal.registry import SECURE

STAGES = ("keys", "shares", "masked", "unmask")
KEY_BYTES = 32
PLAIN_BYTES = 8 + 2 * shamir.SHARE_BYTES  # sender, receiver, share of b, share of s
CT_BYTES = PLAIN_BYTES + 16  # AES-GCM's tag
_NONCE = bytes(12)  # every share key encrypts exactly one message
log = logging.getLogger("shoal.fl")
_SETUP_KEYS = {"round", "participants", "k", "threshold", "graph_seed", "numel", "value_bits", "clip_range",
               "bits", "noise_variance", "min_survivors", "model_hash"}


class ProtocolError(ValueError):
    """A message that breaks the protocol (malformed, forged, replayed, out of turn); the text says how."""


class RoundAborted(RuntimeError):
    """Too few clients left to finish the round securely; the text says which stage and why."""


def model_hash(weights: torch.Tensor) -> str:
    """SHA-256 of the float32 global weights, hex: what every participant of a round must have seen."""
    return hashlib.sha256(weights.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Setup:
    """What the server announces for a round and every participant then agrees on."""

    round: int
    participants: tuple[int, ...]
    k: int  # neighbours of each client
    threshold: int  # t: shares that recover a client's secrets
    graph_seed: int
    numel: int
    value_bits: int
    clip_range: float
    bits: int  # b: residues modulo 2**b on the wire
    noise_variance: float  # each client's distributed-DP noise, in levels (0: none)
    min_survivors: int
    model_hash: str

    def to_meta(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _SETUP_KEYS}, "participants": list(self.participants)}

    @classmethod
    def from_meta(cls, meta: Any, *, numel: int | None = None) -> Setup:
        """A setup from a round's config, checked: ProtocolError names what does not fit."""
        if not isinstance(meta, dict) or set(meta) != _SETUP_KEYS:
            raise ProtocolError(f"the secure-aggregation setup must have exactly the keys {sorted(_SETUP_KEYS)}")
        ints = ("round", "k", "threshold", "graph_seed", "numel", "value_bits", "bits", "min_survivors")
        if not all(_is_int(meta[k]) and meta[k] >= 0 for k in ints):
            raise ProtocolError(f"setup: {', '.join(ints)} must be non-negative integers")
        parts = check_round_meta(meta, numel)
        n = len(parts)
        if meta["k"] != neighbours.degree(n, meta["k"]) or not 1 <= meta["threshold"] <= max(meta["k"], 1):
            raise ProtocolError(f"setup: k={meta['k']} and threshold={meta['threshold']} do not fit {n} participants")
        if not 2 <= meta["value_bits"] <= meta["bits"] <= fixed_point.MAX_BITS:
            raise ProtocolError("setup: need 2 <= value_bits <= bits <= 32")
        if not 1 <= meta["min_survivors"] <= n:
            raise ProtocolError(f"setup: min_survivors must be in [1, {n}]")
        for key in ("clip_range", "noise_variance"):
            if not isinstance(meta[key], (int, float)) or isinstance(meta[key], bool) or not math.isfinite(meta[key]) \
                    or meta[key] < 0:
                raise ProtocolError(f"setup: {key} must be a finite non-negative number")
        if meta["clip_range"] <= 0:
            raise ProtocolError("setup: clip_range must be positive")
        try:
            needed = fixed_point.wire_bits(meta["value_bits"], n, math.sqrt(meta["noise_variance"] * n))
        except ValueError as err:
            raise ProtocolError(f"setup: {err}") from None
        if meta["bits"] < needed:
            raise ProtocolError(f"setup: {meta['bits']} bits would let the sum of {n} inputs wrap around")
        return cls(**{**meta, "participants": tuple(parts), "clip_range": float(meta["clip_range"]),
                      "noise_variance": float(meta["noise_variance"])})

    @cached_property
    def graph(self) -> dict[int, list[int]]:
        return neighbours.graph(list(self.participants), self.k, self.graph_seed)

    @cached_property
    def _context(self) -> bytes:
        return struct.pack("<Q", self.round) + bytes.fromhex(self.model_hash)


def check_round_meta(meta: dict[str, Any], numel: int | None) -> list[int]:
    """The checks every secure setup shares: its participants (returned), model hash and numel."""
    parts = meta["participants"]
    if not isinstance(parts, list) or not parts or not all(_is_int(p) and p >= 0 for p in parts) \
            or parts != sorted(set(parts)):
        raise ProtocolError("setup: participants must be a sorted list of distinct client numbers")
    h = meta["model_hash"]
    if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ProtocolError("setup: model_hash must be a SHA-256 hex digest")
    if numel is not None and meta["numel"] != numel:
        raise ProtocolError(f"setup: numel {meta['numel']}, the model has {numel} values")
    return parts


def plan(rnd: int, participants: list[int], numel: int, weights_hash: str, *, value_bits: int, clip_range: float,
         neighbours_k: int | None, threshold: float, min_fraction: float, noise_std: float = 0.0) -> Setup:
    """The server's setup for a round. ``noise_std``: distributed DP's total noise std on the sum, in the
    update's units; each client adds its share of it, scaled so that ``min_survivors`` shares carry it all."""
    parts = sorted(participants)
    n = len(parts)
    k = neighbours.degree(n, neighbours_k)
    t = max(1, min(k, math.floor(threshold * k) + 1))
    min_survivors = max(1, math.ceil(min_fraction * n))
    step = clip_range / fixed_point.levels(value_bits)
    variance = (noise_std / step) ** 2 / min_survivors if noise_std > 0 else 0.0
    bits = fixed_point.wire_bits(value_bits, n, math.sqrt(variance * n))
    return Setup(round=rnd, participants=tuple(parts), k=k, threshold=t, graph_seed=secrets.randbits(62),
                 numel=numel, value_bits=value_bits, clip_range=float(clip_range), bits=bits,
                 noise_variance=float(variance), min_survivors=min_survivors, model_hash=weights_hash)


class SecAggOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value_bits: int = Field(16, ge=2, le=24, description="bits of one coordinate's fixed-point code; the wire "
                            "carries value_bits + ceil(log2 clients) (+ noise headroom)")
    clip_range: float = Field(0.5, gt=0, description="each coordinate of an update is clipped to [-clip_range, "
                              "clip_range] before it is quantised")
    neighbours: Optional[int] = Field(None, ge=2, description="k, the clients each one shares with (SecAgg+); "
                                      "none: about 3 log2 n (all n - 1 for small rounds)")
    threshold: float = Field(0.5, ge=0, lt=1, description="t = floor(threshold * k) + 1 shares recover a "
                             "client's secrets")
    min_fraction: float = Field(0.5, gt=0, le=1, description="the round aborts when fewer than this share of "
                                "the selected clients send masked inputs; distributed DP's noise is sized so that "
                                "this many shares carry all of it")
    stage_timeout_s: float = Field(30.0, gt=0, description="gRPC: how long the server waits for each stage "
                                   "other than the masked inputs (which wait until fl.deadline_s)")


@SECURE.register("secagg", SecAggOptions)
class SecAgg:
    """SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020): masked fixed-point updates, the server sees only the sum."""

    distributed_noise = True  # its clients add Skellam shares of fl.privacy's noise (setup's noise_std)
    runs_over_grpc = True  # shoal fl server / client run its stages (the Secure call)
    needs_keys = False  # every key is made in the round
    sent = "masked input"  # what a client's log says it sent

    def __init__(self, options: SecAggOptions):
        self.options = options

    def setup(self, rnd: int, participants: list[int], weights: torch.Tensor, noise_std: float = 0.0) -> Setup:
        o = self.options
        return plan(rnd, participants, weights.numel(), model_hash(weights), value_bits=o.value_bits,
                    clip_range=o.clip_range, neighbours_k=o.neighbours, threshold=o.threshold,
                    min_fraction=o.min_fraction, noise_std=noise_std)

    def rounding_bound(self, numel: int) -> float:
        """How much fixed-point rounding can add to an update's L2 norm (DP's sensitivity grows by it)."""
        return fixed_point.rounding_bound(numel, self.options.clip_range, self.options.value_bits)

    def setup_from_meta(self, meta: Any, numel: int) -> Setup:
        return Setup.from_meta(meta, numel=numel)

    def server(self, setup: Setup) -> SecAggServer:
        return SecAggServer(setup)

    def client(self, setup: Setup, me: int, weights: torch.Tensor) -> SecAggClient:
        return SecAggClient(setup, me, weights)

    def drop_point(self, drop_stage: str) -> str:
        """fleet.drop_stage names this protocol's stages."""
        return drop_stage

    def local_round(self, setup: Setup, updates: dict[int, torch.Tensor], weights: torch.Tensor, *,
                    drop_at: dict[int, str]) -> tuple[Aggregate | None, str | None, Traffic]:
        """The whole round in this process (``shoal fl simulate``): :func:`run_round`."""
        return run_round(setup, updates, weights, drop_at=drop_at)


# --- the client ---------------------------------------------------------------------------
class SecAggClient:
    """One participant's side of one round; each stage is called once, in order."""

    def __init__(self, setup: Setup, me: int, weights: torch.Tensor | None = None):
        if me not in setup.participants:
            raise ProtocolError(f"client {me} is not a participant of round {setup.round}")
        if weights is not None and model_hash(weights) != setup.model_hash:
            raise ProtocolError(f"round {setup.round}: the weights received do not match the model hash the "
                                "round announced; refusing it")
        self.setup, self.me = setup, me
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(KEY_BYTES)
        self._done = 0
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (c public, s public)
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (its share of b, its share of s)
        self._peers: list[int] = []  # neighbours in U2: the pairwise masks
        self.rng = np.random.default_rng(secrets.randbits(128))  # rounding and noise

    def _stage(self, name: str) -> None:
        if self._done >= len(STAGES) or STAGES[self._done] != name:
            raise ProtocolError(f"client {self.me}: stage {name!r} out of turn (next: "
                                f"{STAGES[self._done] if self._done < len(STAGES) else 'none'})")
        self._done += 1

    stages = STAGES
    result_stage = "masked"  # the message that carries the client's loss and sample count

    def message(self, stage: str, meta: dict[str, Any], reply: dict[str, torch.Tensor],
                update: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What this client sends at ``stage``, given the server's reply to its previous stage."""
        if stage == "keys":
            return self.advertise()
        if stage == "shares":
            return self.share(reply)
        return self.masked_input(reply, update) if stage == "masked" else self.unmask(reply)

    def advertise(self) -> dict[str, torch.Tensor]:
        self._stage("keys")
        return {"c_pk": _u8(_public(self._c)), "s_pk": _u8(_public(self._s))}

    def share(self, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._stage("shares")
        _expect(reply, {"ids": (torch.int64, None), "c_pk": (torch.uint8, KEY_BYTES), "s_pk": (torch.uint8, KEY_BYTES)})
        ids = reply["ids"].tolist()
        mine = set(self.setup.graph[self.me])
        if ids != sorted(set(ids)) or not set(ids) <= mine:
            raise ProtocolError(f"client {self.me}: the keys offered are not from its neighbours")
        if len(ids) < self.setup.threshold:
            raise ProtocolError(f"client {self.me}: {len(ids)} neighbours, fewer than the threshold "
                                f"{self.setup.threshold}")
        c_pks, s_pks = reply["c_pk"].numpy(), reply["s_pk"].numpy()
        self._keys = {v: (c_pks[i].tobytes(), s_pks[i].tobytes()) for i, v in enumerate(ids)}
        xs = [v + 1 for v in ids]
        b_shares = shamir.split(int.from_bytes(self._seed, "little"), self.setup.threshold, xs)
        s_shares = shamir.split(int.from_bytes(self._s.private_bytes_raw(), "little"), self.setup.threshold, xs)
        rows = []
        for v in ids:
            key, aad = self._share_key(v, sender=self.me, receiver=v)
            plain = struct.pack("<II", self.me, v) + shamir.to_bytes(b_shares[v + 1]) + shamir.to_bytes(s_shares[v + 1])
            rows.append(np.frombuffer(AESGCM(key).encrypt(_NONCE, plain, aad), dtype=np.uint8))
        return {"to": torch.tensor(ids, dtype=torch.int64), "ct": torch.from_numpy(np.stack(rows).copy()),
                "commit": _u8(_commitment(self.setup, self.me, self._seed))}

    def masked_input(self, reply: dict[str, torch.Tensor], update: torch.Tensor) -> dict[str, torch.Tensor]:
        self._stage("masked")
        _expect(reply, {"from": (torch.int64, None), "ct": (torch.uint8, CT_BYTES)})
        senders = reply["from"].tolist()
        if senders != sorted(set(senders)) or not set(senders) <= set(self._keys):
            raise ProtocolError(f"client {self.me}: shares offered from clients it exchanged no keys with")
        if update.numel() != self.setup.numel:
            raise ValueError(f"the update has {update.numel()} values, the round {self.setup.numel}")
        for i, u in enumerate(senders):
            key, aad = self._share_key(u, sender=u, receiver=self.me)
            try:
                plain = AESGCM(key).decrypt(_NONCE, reply["ct"][i].numpy().tobytes(), aad)
            except InvalidTag:
                raise ProtocolError(f"client {self.me}: the share from client {u} does not decrypt: it was made "
                                    "for another model or round, or forged; refusing the round") from None
            sender, receiver = struct.unpack_from("<II", plain)
            if (sender, receiver) != (u, self.me):
                raise ProtocolError(f"client {self.me}: the share from client {u} names {sender} -> {receiver}")
            self._held[u] = (shamir.from_bytes(plain[8:8 + shamir.SHARE_BYTES]),
                             shamir.from_bytes(plain[8 + shamir.SHARE_BYTES:]))
        self._peers = senders
        s = self.setup
        codes = fixed_point.encode(update, s.clip_range, s.value_bits, self.rng)
        codes += fixed_point.skellam(s.numel, s.noise_variance, self.rng)
        y = fixed_point.to_residues(codes)
        y += prg(self._seed, s.numel)
        for v in senders:
            mask = prg(pairwise_key(s, self.me, v, self._s, self._keys[v][1]), s.numel)
            if self.me < v:
                y += mask
            else:
                y -= mask
        return {"y": torch.from_numpy(pack_wide(y & np.uint32((1 << s.bits) - 1), s.bits))}

    def unmask(self, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._stage("unmask")
        _expect(reply, {"survivors": (torch.int64, None), "dropped": (torch.int64, None)})
        alive, gone = reply["survivors"].tolist(), reply["dropped"].tolist()
        if alive != sorted(set(alive)) or gone != sorted(set(gone)):
            raise ProtocolError(f"client {self.me}: survivors and dropped must be sorted, without repeats")
        if set(alive) & set(gone):
            # The one thing that would unmask a client: both its self mask and its keys.
            raise ProtocolError(f"client {self.me}: clients {sorted(set(alive) & set(gone))} are named both as "
                                "survivors and as dropped; refusing to reveal both of their shares")
        if not (set(alive) | set(gone)) <= set(self._held):
            raise ProtocolError(f"client {self.me}: shares asked for of clients it holds none of")
        return {"b_from": torch.tensor(alive, dtype=torch.int64),
                "b": _rows([shamir.to_bytes(self._held[u][0]) for u in alive], shamir.SHARE_BYTES),
                "sk_from": torch.tensor(gone, dtype=torch.int64),
                "sk": _rows([shamir.to_bytes(self._held[u][1]) for u in gone], shamir.SHARE_BYTES)}

    def _share_key(self, other: int, *, sender: int, receiver: int) -> tuple[bytes, bytes]:
        info = b"shoal-secagg/share" + self.setup._context + struct.pack("<II", sender, receiver)
        secret = _agree(self._c, self._keys[other][0], other)
        return _hkdf(secret, info), info


# --- the server ---------------------------------------------------------------------------
@dataclass
class Aggregate:
    total: torch.Tensor  # the float sum of the survivors' (quantised, noised) updates
    clients: list[int]  # U3: whose inputs it holds
    forged: list[tuple[int, int, str]] = field(default_factory=list)  # (sent by, about, "b" | "s")


class SecAggServer:
    """The server's side of one round: it sees public keys, encrypted shares, masked inputs and the
    shares it needs, and finally the sum. Each client's message per stage is taken once."""

    stages = STAGES
    result_stage = "masked"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.stage = 0  # index into STAGES of the open stage
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shares: dict[int, dict[int, bytes]] = {}  # sender -> {receiver: ciphertext}
        self.commits: dict[int, bytes] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.answers: dict[int, dict[str, Any]] = {}
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()

    @property
    def open_stage(self) -> str | None:
        return STAGES[self.stage] if self.stage < len(STAGES) else None

    def expected(self) -> set[int]:
        """Who the open stage waits for."""
        return {"keys": set(self.setup.participants), "shares": self.u1, "masked": self.u2,
                "unmask": self.u3}.get(self.open_stage or "", set())

    def received(self) -> set[int]:
        return set({"keys": self.keys, "shares": self.shares, "masked": self.masked,
                    "unmask": self.answers}.get(self.open_stage or "", {}))

    def receive(self, stage: str, client: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take one client's message for ``stage``; ProtocolError if it does not belong."""
        check_turn(self, stage, client)
        getattr(self, f"_take_{stage}")(client, tensors)

    def _take_keys(self, client: int, t: dict[str, torch.Tensor]) -> None:
        _expect(t, {"c_pk": (torch.uint8, None), "s_pk": (torch.uint8, None)})
        if t["c_pk"].numel() != KEY_BYTES or t["s_pk"].numel() != KEY_BYTES:
            raise ProtocolError(f"client {client}: public keys are {KEY_BYTES} bytes")
        self.keys[client] = (t["c_pk"].numpy().tobytes(), t["s_pk"].numpy().tobytes())

    def _take_shares(self, client: int, t: dict[str, torch.Tensor]) -> None:
        _expect(t, {"to": (torch.int64, None), "ct": (torch.uint8, CT_BYTES), "commit": (torch.uint8, None)})
        want = self._live_neighbours(client, self.u1)
        if t["to"].tolist() != want:
            raise ProtocolError(f"client {client}: shares addressed to {t['to'].tolist()}, its neighbours are {want}")
        if t["commit"].numel() != 32:
            raise ProtocolError(f"client {client}: the commitment is 32 bytes")
        cts = t["ct"].numpy()
        self.shares[client] = {v: cts[i].tobytes() for i, v in enumerate(want)}
        self.commits[client] = t["commit"].numpy().tobytes()

    def _take_masked(self, client: int, t: dict[str, torch.Tensor]) -> None:
        _expect(t, {"y": (torch.uint8, None)})
        want = wide_bytes(self.setup.numel, self.setup.bits)
        if t["y"].numel() != want:
            raise ProtocolError(f"client {client}: a masked input of {t['y'].numel()} bytes, the round's is {want}")
        self.masked[client] = unpack_wide(t["y"].numpy(), self.setup.bits, self.setup.numel)

    def _take_unmask(self, client: int, t: dict[str, torch.Tensor]) -> None:
        size = shamir.SHARE_BYTES
        _expect(t, {"b_from": (torch.int64, None), "b": (torch.uint8, size), "sk_from": (torch.int64, None),
                    "sk": (torch.uint8, size)})
        alive, gone = self._unmask_request(client)
        if t["b_from"].tolist() != alive or t["sk_from"].tolist() != gone:
            raise ProtocolError(f"client {client}: shares for other clients than asked")
        try:
            b = {u: shamir.from_bytes(t["b"][i].numpy().tobytes()) for i, u in enumerate(alive)}
            s = {u: shamir.from_bytes(t["sk"][i].numpy().tobytes()) for i, u in enumerate(gone)}
        except ValueError as err:
            raise ProtocolError(f"client {client}: {err}") from None
        self.answers[client] = {"b": b, "s": s}

    def close(self) -> None:
        """End the open stage with what arrived; RoundAborted when too few are left to go on."""
        stage = self.open_stage
        if stage is None:
            raise ProtocolError("the round is over")
        need = self.setup.min_survivors
        if stage == "keys":
            alive = set(self.keys)
            while True:  # a client with fewer than t live neighbours could not have its secrets recovered
                short = {u for u in alive if len(set(self.setup.graph[u]) & alive) < self.setup.threshold}
                if not short:
                    break
                alive -= short
            self.u1 = alive
            got, what = len(alive), "sent keys (with enough neighbours that did)"
        elif stage == "shares":
            self.u2 = set(self.shares)
            got, what = len(self.u2), "shared their secrets"
        elif stage == "masked":
            self.u3 = set(self.masked)
            got, what = len(self.u3), "sent a masked input"
        else:
            got, what = len(self.answers), "answered the unmasking"
            need = 1
        self.stage += 1
        if got < need:
            self.stage = len(STAGES)
            raise RoundAborted(f"round {self.setup.round}: only {got} of {len(self.setup.participants)} clients "
                               f"{what} at stage {stage!r}; the round needs {need}")

    def ready(self, stage: str, client: int) -> bool:
        """Whether ``client``'s call for ``stage`` can be answered: once the stage has closed."""
        return self.stage > STAGES.index(stage)

    def reply(self, stage: str, client: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What ``client`` needs after ``stage`` closed: its next stage's input (meta says if it is out)."""
        if stage == "keys":
            if client not in self.u1:
                return {"excluded": "too few of its neighbours sent keys"}, {}
            ids = self._live_neighbours(client, self.u1)
            return {}, {"ids": torch.tensor(ids, dtype=torch.int64),
                        "c_pk": _rows([self.keys[v][0] for v in ids], KEY_BYTES),
                        "s_pk": _rows([self.keys[v][1] for v in ids], KEY_BYTES)}
        if stage == "shares":
            if client not in self.u2:
                return {"excluded": "its shares did not arrive"}, {}
            senders = [u for u in self._live_neighbours(client, self.u2) if client in self.shares[u]]
            return {}, {"from": torch.tensor(senders, dtype=torch.int64),
                        "ct": _rows([self.shares[u][client] for u in senders], CT_BYTES)}
        if stage == "masked":
            if client not in self.u3:
                return {"excluded": "its masked input did not arrive"}, {}
            alive, gone = self._unmask_request(client)
            return {}, {"survivors": torch.tensor(alive, dtype=torch.int64),
                        "dropped": torch.tensor(gone, dtype=torch.int64)}
        return {"done": True}, {}

    def _live_neighbours(self, client: int, live: set[int]) -> list[int]:
        return [v for v in self.setup.graph[client] if v in live]

    def _unmask_request(self, client: int) -> tuple[list[int], list[int]]:
        held = [u for u in self._live_neighbours(client, self.u2) if client in self.shares[u]]
        return [u for u in held if u in self.u3], [u for u in held if u not in self.u3]

    def result(self) -> Aggregate:
        """The sum over U3; RoundAborted when a secret cannot be recovered."""
        if self.stage < len(STAGES):
            raise ProtocolError(f"the round is at stage {self.open_stage!r}, not finished")
        s = self.setup
        forged: list[tuple[int, int, str]] = []
        total = np.zeros(s.numel, dtype=np.uint32)
        for u in sorted(self.u3):
            total += self.masked[u]
            seed = self._recover(u, "b", lambda v, u=u: _commitment(s, u, _seed_bytes(v)) == self.commits[u], forged)
            total -= prg(_seed_bytes(seed), s.numel)
        for u in sorted(self.u2 - self.u3):
            s_pk = self.keys[u][1]
            secret = self._recover(u, "s", lambda v: _key_of(v) is not None and _public(_key_of(v)) == s_pk, forged)
            key = _key_of(secret)
            for w in self.setup.graph[u]:
                if w in self.u3 and w in self.shares[u]:  # w masked with u: remove the half u will not cancel
                    mask = prg(pairwise_key(s, u, w, key, self.keys[w][1]), s.numel)
                    if w < u:
                        total -= mask
                    else:
                        total += mask
        summed = fixed_point.decode_sum(total, s.bits, s.clip_range, s.value_bits)
        return Aggregate(summed, sorted(self.u3), forged)

    def _recover(self, u: int, kind: str, check: Any, forged: list[tuple[int, int, str]]) -> int:
        shares = {w + 1: a[kind][u] for w, a in self.answers.items() if u in a[kind]}
        found = shamir.combine_checked(shares, self.setup.threshold, check)
        if found is None:
            what = "self mask" if kind == "b" else "dropped key"
            raise RoundAborted(f"round {self.setup.round}: client {u}'s {what} cannot be recovered: {len(shares)} "
                               f"shares arrived, {self.setup.threshold} correct ones are needed")
        secret, bad = found
        forged += [(x - 1, u, kind) for x in bad]
        return secret


def check_turn(server: Any, stage: str, client: int) -> None:
    """ProtocolError unless ``stage`` is the round server's open stage, it waits for ``client``, and the
    client has not sent it yet (a replay)."""
    if stage not in server.stages:
        raise ProtocolError(f"unknown stage {stage!r}")
    if stage != server.open_stage:
        raise ProtocolError(f"stage {stage!r} is not open (open: {server.open_stage})")
    if client not in server.expected():
        raise ProtocolError(f"client {client} has no part in stage {stage!r}")
    if client in server.received():
        raise ProtocolError(f"client {client} already sent its {stage!r} message (a replay?)")


# --- keys and masks -----------------------------------------------------------------------
def prg(key: bytes, numel: int) -> np.ndarray:
    """``numel`` uint32 words of ChaCha20's key stream under a 256-bit key."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * numel)), dtype="<u4").astype(np.uint32)


def pairwise_key(setup: Setup, u: int, v: int, private: X25519PrivateKey, other_public: bytes) -> bytes:
    """s_uv: the mask key u and v agree on (the same from either side)."""
    lo, hi = min(u, v), max(u, v)
    return _hkdf(_agree(private, other_public, v), b"shoal-secagg/mask" + setup._context + struct.pack("<II", lo, hi))


def _agree(private: X25519PrivateKey, other_public: bytes, other: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(other_public))
    except ValueError:  # a low-order point gives the all-zero secret
        raise ProtocolError(f"client {other}'s public key is not usable") from None


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _commitment(setup: Setup, client: int, seed: bytes) -> bytes:
    return hashlib.sha256(b"shoal-secagg/seed" + setup._context + struct.pack("<I", client) + seed).digest()


def _seed_bytes(value: int) -> bytes:
    return value.to_bytes(KEY_BYTES, "little") if value < 1 << (8 * KEY_BYTES) else b""


def _key_of(value: int) -> X25519PrivateKey | None:
    if value >= 1 << (8 * KEY_BYTES):
        return None
    return X25519PrivateKey.from_private_bytes(value.to_bytes(KEY_BYTES, "little"))


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _u8(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _rows(items: list[bytes], width: int) -> torch.Tensor:
    if not items:
        return torch.zeros((0, width), dtype=torch.uint8)
    return torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).reshape(len(items), width).copy())


def _expect(tensors: dict[str, torch.Tensor], spec: dict[str, tuple[torch.dtype, int | None]]) -> None:
    """Exactly these tensors: (dtype, width of each row, None for a flat one); the id lists and rows agree."""
    if set(tensors) != set(spec):
        raise ProtocolError(f"expected the tensors {sorted(spec)}, got {sorted(tensors)}")
    for name, (dtype, width) in spec.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise ProtocolError(f"tensor {name!r} is {t.dtype}, expected {dtype}")
        if width is None and t.dim() != 1:
            raise ProtocolError(f"tensor {name!r} must be flat")
        if width is not None and (t.dim() != 2 or t.shape[1] != width):
            raise ProtocolError(f"tensor {name!r} must have rows of {width} bytes, got shape {tuple(t.shape)}")
    ids = [n for n, (d, w) in spec.items() if d == torch.int64]
    rows = [n for n, (d, w) in spec.items() if w is not None]
    pairs = [(ids[0], r) for r in rows] if len(ids) == 1 else list(zip(ids, rows))
    for id_name, row_name in pairs:
        if tensors[id_name].numel() != tensors[row_name].shape[0]:
            raise ProtocolError(f"{tensors[id_name].numel()} ids in {id_name!r}, {tensors[row_name].shape[0]} "
                                f"rows in {row_name!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- one round in one process (shoal fl simulate) -----------------------------------------
@dataclass
class Traffic:
    """Bytes each client sent and received in a round's protocol, and the masked inputs' part of the uplink."""

    uplink: dict[int, int] = field(default_factory=dict)
    downlink: dict[int, int] = field(default_factory=dict)
    masked_bytes: int = 0

    @property
    def overhead_bytes(self) -> int:
        """Keys, shares and commitments: everything up but the masked inputs."""
        return sum(self.uplink.values()) - self.masked_bytes


def run_round(setup: Setup, updates: dict[int, torch.Tensor], weights: torch.Tensor, *,
              drop_at: dict[int, str] | None = None) -> tuple[Aggregate | None, str | None, Traffic]:
    """Run the whole protocol for ``updates`` (client -> its update) through the same messages a
    gRPC round sends, each packed and unpacked with :mod:`shoal.fl.wire`. ``drop_at``: the stage at
    which a client stops answering. Returns the aggregate (or None and why the round aborted)."""
    from shoal.fl import wire

    drop_at = drop_at or {}
    traffic = Traffic()
    server = SecAggServer(setup)
    clients: dict[int, SecAggClient] = {}
    for u in updates:
        try:
            clients[u] = SecAggClient(setup, u, weights)
        except ProtocolError as err:
            log.warning("round %d: client %d refuses: %s", setup.round, u, err)

    def carry(tensors: dict[str, torch.Tensor], u: int, book: dict[int, int]) -> dict[str, torch.Tensor]:
        book[u] = book.get(u, 0) + wire.payload_bytes(tensors)
        return wire.unpack(wire.pack({}, tensors))[1]

    replies: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for stage in STAGES:
            for u, client in list(clients.items()):
                if drop_at.get(u) == stage or (stage != "keys" and u not in replies):
                    continue
                try:
                    if stage == "keys":
                        message = client.advertise()
                    elif stage == "shares":
                        message = client.share(replies[u])
                    elif stage == "masked":
                        message = client.masked_input(replies[u], updates[u])
                    else:
                        message = client.unmask(replies[u])
                except ProtocolError as err:
                    log.warning("round %d: client %d leaves at stage %r: %s", setup.round, u, stage, err)
                    replies.pop(u, None)
                    continue
                sent = carry(message, u, traffic.uplink)
                if stage == "masked":
                    traffic.masked_bytes += wire.payload_bytes(message)
                try:
                    server.receive(stage, u, sent)
                except ProtocolError as err:
                    log.warning("round %d: client %d's %r message rejected: %s", setup.round, u, stage, err)
            server.close()
            replies = {}
            for u in _passed(server, stage):
                meta, tensors = server.reply(stage, u)
                if not meta:
                    replies[u] = carry(tensors, u, traffic.downlink)
        aggregate = server.result()
    except RoundAborted as err:
        return None, str(err), traffic
    for sender, about, kind in aggregate.forged:
        log.warning("round %d: client %d sent a wrong share of client %d's %s", setup.round, sender, about,
                    "self mask" if kind == "b" else "key")
    return aggregate, None, traffic


def _passed(server: SecAggServer, stage: str) -> set[int]:
    """Who is still in after ``stage`` closed."""
    return {"keys": server.u1, "shares": server.u2, "masked": server.u3, "unmask": set()}[stage]
