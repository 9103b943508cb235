"""``fl.secure: ckks``: a round's updates summed under CKKS, the server adding ciphertexts it cannot read.

The encryption is :mod:`shoal.fl.secure.ckks` (Cheon, Kim, Kim and Song 2017, through TenSEAL); this
file is the round around it, the same code in ``shoal fl simulate`` (:meth:`Ckks.local_round`) and over
gRPC (``shoal fl server`` / ``client``, the ``Secure`` call). The clients share one secret context, the
server holds the public one (no secret key: it adds, it cannot decrypt). Over gRPC the keys come from
``shoal fl keys`` (:mod:`shoal.fl.secure.ckks_keys`), handed out of band, so their bytes are in no
round's traffic; a simulation makes its own. For a round with participants U:

1. Setup: the server announces, in the round's Task, the CKKS parameters (sized for
   ``clients_per_round``: the key's), the hash of the global model every participant must have been
   sent, and the fewest uploads the sum may hold.
2. ``upload``: each client of U checks the model's hash and that the parameters are its key's, trains,
   encrypts its update (clipped to ``clip_range``, stochastically rounded to ``value_bits``) and sends
   the ciphertexts with its loss and sample count. The server checks each upload (:func:`ckks.check`)
   and refuses, logging why, a malformed or repeated one. The stage closes at ``fl.deadline_s`` or once
   every participant uploaded.
3. The server adds the accepted uploads with the public context; one whose ciphertexts do not load
   is found, logged and left out. A: whose uploads are in the sum.
4. ``decrypt``: the server answers the lowest-numbered client of A's upload call with the encrypted
   sum and |A|; that client checks |A| against the round's bounds, decrypts and returns the float32
   sum, which the server checks for shape and range. A client that does not answer within
   ``stage_timeout_s``, or answers wrongly, is passed over for the next one of A. The other clients'
   calls are answered ``done`` once the sum is back.

Dropouts (``fleet.drop_stage``, in secagg's stage names): a client dropped at ``keys``, ``shares`` or
``masked`` is gone before its upload and sends nothing: the sum is over the clients that uploaded. One
dropped at ``unmask`` uploaded and then went: it is in the sum but does not decrypt it. The round aborts,
saying why, when fewer than ``min_fraction`` of U are in A (the decrypting client learns the sum, which
is one client's update when A is one client) or when no client of A returns the sum decrypted.

Trust model: an honest-but-curious server that colludes with no client. The server sees ciphertexts
and the sum; every client holds the key that opens every upload, so a client that sees another's
ciphertext reads it (SecAgg+ hides updates from any minority of colluding clients; this does not: no
threshold or multi-key variant is built). A malicious server could send the decrypting client one
client's ciphertext labelled as a sum of |A| and learn that update; the client can check |A| against
the round's bounds but not what the ciphertext holds. Neither the server's sum nor the decrypting
client's plaintext can be verified beyond its range. The ciphertexts are not bound to the round: the
server takes one upload a client a round from the token that holds the partition, and TLS keeps anyone
else from replaying one.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal.fl import wire
from shoal.fl.secure import ckks, fixed_point
from shoal.fl.secure.ckks_keys import PUBLIC_FILE, SECRET_FILE, CkksKey, params_from_meta, params_meta, read_key
from shoal.fl.secure.secagg import (Aggregate, ProtocolError, RoundAborted, Traffic, _is_int, check_round_meta,
                                    check_turn, model_hash)
from shoal.registry import SECURE

log = logging.getLogger("shoal.fl")
STAGES = ("upload", "decrypt")


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
    stage_timeout_s: float = Field(30.0, gt=0, description="gRPC: how long the server waits for the client it "
                                   "asked to decrypt the sum before it asks the next one (the uploads wait until "
                                   "fl.deadline_s)")

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
    params: ckks.CkksParams  # sized for at least len(participants)
    min_uploads: int

    def to_meta(self) -> dict[str, Any]:
        return {"mechanism": "ckks", "round": self.round, "participants": list(self.participants), "numel": self.numel,
                "model_hash": self.model_hash, "params": params_meta(self.params), "min_uploads": self.min_uploads}

    @classmethod
    def from_meta(cls, meta: Any, *, numel: int | None = None) -> CkksSetup:
        """A setup from a round's config, checked: ProtocolError names what does not fit."""
        if not isinstance(meta, dict) or set(meta) != _SETUP_KEYS or meta["mechanism"] != "ckks":
            raise ProtocolError(f"the ckks setup must have exactly the keys {sorted(_SETUP_KEYS)}")
        if not all(_is_int(meta[k]) and meta[k] >= 0 for k in ("round", "numel", "min_uploads")):
            raise ProtocolError("setup: round, numel and min_uploads must be non-negative integers")
        parts = check_round_meta(meta, numel)
        if not 1 <= meta["min_uploads"] <= len(parts):
            raise ProtocolError(f"setup: min_uploads must be in [1, {len(parts)}]")
        try:
            params = params_from_meta(meta["params"])
        except ValueError as err:
            raise ProtocolError(f"setup: {err}") from None
        if params.max_clients < len(parts):
            raise ProtocolError(f"setup: parameters for {params.max_clients} clients, the round has {len(parts)}")
        return cls(round=meta["round"], participants=tuple(parts), numel=meta["numel"], model_hash=meta["model_hash"],
                   params=params, min_uploads=meta["min_uploads"])


_SETUP_KEYS = {"mechanism", "round", "participants", "numel", "model_hash", "params", "min_uploads"}


@SECURE.register("ckks", CkksOptions)
class Ckks:
    """CKKS through TenSEAL: clients encrypt their updates, the server adds ciphertexts, a client decrypts the sum."""

    # Skellam noise would need room in every slot beyond the clients' levels, which the exactness bound
    # of CkksParams does not size yet; FederationConfig refuses fl.privacy with it.
    distributed_noise = False
    runs_over_grpc = True  # shoal fl server / client run its stages, with keys from shoal fl keys
    needs_keys = True
    sent = "encrypted update"  # what a client's log says it sent

    def __init__(self, options: CkksOptions):
        self.options = options
        # (N, coeff_mod_bit_sizes) -> (secret context, public context): one key a parameter set, kept
        # across rounds (clients_per_round fixes it, so one key a run).
        self._contexts: dict[tuple[int, tuple[int, ...]], tuple[bytes, bytes]] = {}
        self.key: CkksKey | None = None  # over gRPC: this process's key file (the public one on the server)

    def params(self, max_clients: int) -> ckks.CkksParams:
        """The parameters for rounds of up to ``max_clients`` under these options."""
        o = self.options
        return ckks.CkksParams.for_addition(max_clients, value_bits=o.value_bits, clip_range=o.clip_range,
                                            public_key_encryption=o.public_key_encryption)

    def use_key(self, path: str | Path, *, server: bool, clients_per_round: int) -> None:
        """Take this process's key file: the server the public one, a client the secret one. ValueError
        names the file and what is wrong with it for these options."""
        key = read_key(path)
        if server and key.secret:
            raise ValueError(f"{path} holds the secret key: the server must be given only the public one "
                             f"({PUBLIC_FILE}), or it could decrypt every client's upload")
        if not server and not key.secret:
            raise ValueError(f"{path} is the public key, which cannot decrypt: a client needs {SECRET_FILE}")
        o, p = self.options, key.params
        if (p.value_bits, p.clip_range, p.public_key_encryption) != (o.value_bits, o.clip_range,
                                                                    o.public_key_encryption):
            raise ValueError(f"{path} was made for value_bits={p.value_bits}, clip_range={p.clip_range:g}, "
                             f"public_key_encryption={p.public_key_encryption}, fl.secure asks for "
                             f"value_bits={o.value_bits}, clip_range={o.clip_range:g}, "
                             f"public_key_encryption={o.public_key_encryption}; make new keys with `shoal fl keys`")
        if p.max_clients < clients_per_round:
            raise ValueError(f"{path} was made for rounds of up to {p.max_clients} clients, fl.clients_per_round is "
                             f"{clients_per_round}; make new keys with `shoal fl keys`")
        self.key = key

    def setup(self, rnd: int, participants: list[int], weights: torch.Tensor, noise_std: float = 0.0) -> CkksSetup:
        if noise_std > 0:  # FederationConfig refuses fl.privacy with ckks before a run starts
            raise ValueError("ckks adds no distributed DP noise; fl.privacy needs fl.secure=secagg")
        parts = tuple(sorted(participants))
        params = self.key.params if self.key is not None else self.params(len(parts))
        if len(parts) > params.max_clients:
            raise ValueError(f"round {rnd}: {len(parts)} participants, the key is for {params.max_clients}")
        return CkksSetup(round=rnd, participants=parts, numel=weights.numel(), model_hash=model_hash(weights),
                         params=params, min_uploads=max(1, math.ceil(self.options.min_fraction * len(parts))))

    def setup_from_meta(self, meta: Any, numel: int) -> CkksSetup:
        return CkksSetup.from_meta(meta, numel=numel)

    def rounding_bound(self, numel: int) -> float:
        """How much stochastic rounding can add to an update's L2 norm: one step a coordinate, as SecAgg+'s."""
        return fixed_point.rounding_bound(numel, self.options.clip_range, self.options.value_bits)

    def contexts(self, params: ckks.CkksParams) -> tuple[bytes, bytes]:
        """(secret, public) contexts for ``params``: made on first use, then the same."""
        key = (params.poly_modulus_degree, params.coeff_mod_bit_sizes)
        if key not in self._contexts:
            self._contexts[key] = ckks.keygen(params)
        return self._contexts[key]

    def server(self, setup: CkksSetup) -> CkksServer:
        """The server's side of a round over gRPC, with this process's public key."""
        if self.key is None:
            raise ValueError("fl.secure=ckks: the server needs the public key from `shoal fl keys` (--he-key)")
        return CkksServer(setup, self.key.context)

    def client(self, setup: CkksSetup, me: int, weights: torch.Tensor) -> CkksClient:
        """One client's side of a round over gRPC, with this process's secret key."""
        if self.key is None:
            raise ValueError("fl.secure=ckks: a client needs the secret key from `shoal fl keys` (--he-key)")
        if setup.params != self.key.params:
            raise ProtocolError(f"round {setup.round}: the round's CKKS parameters are not this client's key's "
                                "(the server was given another key pair's public key?)")
        return CkksClient(setup, me, weights, self.key.context, self.key.context)

    def drop_point(self, drop_stage: str) -> str:
        """Where a client that fleet.drop_stage drops stops, in this protocol's stages: before its upload
        for secagg's stages up to ``masked``, after it (it will not decrypt) for ``unmask``."""
        return "decrypt" if drop_stage == "unmask" else "upload"

    def local_round(self, setup: CkksSetup, updates: dict[int, torch.Tensor], weights: torch.Tensor, *,
                    drop_at: dict[int, str]) -> tuple[Aggregate | None, str | None, Traffic]:
        """The whole round in this process (``shoal fl simulate``): the gRPC round's server and clients,
        every message through :mod:`shoal.fl.wire`. A client that drops at ``unmask`` is asked to decrypt
        and does not answer, as over gRPC, but nothing reaches it.

        Traffic: a client's uplink is its ciphertexts (``masked_bytes``: all of them, accepted or not);
        the decrypting client's downlink is the encrypted sum and its uplink also holds the float32 sum
        it returns, which is all of ``overhead_bytes``."""
        secret, public = self.contexts(setup.params)
        encrypt_with = public if setup.params.public_key_encryption else secret
        server, traffic = CkksServer(setup, public), Traffic()
        for u in sorted(set(updates) - set(setup.participants)):
            log.warning("round %d: client %d is not a participant; its update is ignored", setup.round, u)
        clients = {}
        for u in setup.participants:
            if u not in updates or self.drop_point(drop_at.get(u, "unmask")) != "decrypt":
                continue  # gone before its upload
            try:
                clients[u] = CkksClient(setup, u, weights, encrypt_with, secret)
            except ProtocolError as err:
                log.warning("round %d: client %d refuses the round: %s", setup.round, u, err)
                continue
            message = clients[u].upload(updates[u])
            traffic.masked_bytes += wire.payload_bytes(message)
            try:
                server.receive("upload", u, _carry(message, u, traffic.uplink))
            except ProtocolError as err:
                log.warning("round %d: client %d's upload rejected: %s", setup.round, u, err)
        try:
            server.close()
            while server.open_stage == "decrypt":
                holder = server.holder
                if drop_at.get(holder) != "unmask":
                    meta, summed = server.reply("upload", holder)
                    try:
                        answer = clients[holder].decrypt(meta, _carry(summed, holder, traffic.downlink))
                    except ProtocolError as err:
                        log.warning("round %d: client %d cannot decrypt the sum: %s", setup.round, holder, err)
                    else:
                        try:
                            server.receive("decrypt", holder, _carry(answer, holder, traffic.uplink))
                        except ProtocolError as err:
                            log.warning("round %d: client %d's decrypted sum refused: %s", setup.round, holder, err)
                server.close()
        except RoundAborted as err:
            return None, str(err), traffic
        return server.result(), None, traffic


class CkksServer:
    """The server's side of one round: checked uploads, their encrypted sum, and the sum a client
    decrypted. ``upload`` closes at the deadline (or once every participant uploaded); then the
    lowest-numbered client in the sum is asked to decrypt it, and when it does not answer in
    ``stage_timeout_s`` (or answers wrongly) the next, until none is left."""

    stages = STAGES
    result_stage = "upload"  # the message that carries the client's loss and sample count

    def __init__(self, setup: CkksSetup, public_context: bytes):
        self.setup, self.public = setup, public_context
        self.stage = 0  # index into STAGES of the open stage
        self.uploads: dict[int, dict[str, torch.Tensor]] = {}
        self.summed: dict[str, torch.Tensor] | None = None
        self.added: list[int] = []  # whose uploads are in the sum
        self.holder: int | None = None  # the client asked to decrypt it
        self.asked: list[int] = []
        self.answered: set[int] = set()
        self.total: torch.Tensor | None = None

    @property
    def open_stage(self) -> str | None:
        return STAGES[self.stage] if self.stage < len(STAGES) else None

    def expected(self) -> set[int]:
        """Who the open stage waits for."""
        if self.open_stage == "upload":
            return set(self.setup.participants)
        return {self.holder} if self.open_stage == "decrypt" else set()

    def received(self) -> set[int]:
        if self.open_stage == "upload":
            return set(self.uploads)
        return {self.holder} & self.answered if self.open_stage == "decrypt" else set()

    def receive(self, stage: str, client: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take one client's message for ``stage``; ProtocolError if it does not belong."""
        check_turn(self, stage, client)
        if stage == "upload":
            try:
                ckks.check(self.setup.params, tensors, self.setup.numel)
            except ValueError as err:
                raise ProtocolError(str(err)) from None
            self.uploads[client] = tensors
            return
        self.answered.add(client)  # right or wrong, its one answer
        try:
            self.total = _check_sum(self.setup, tensors, len(self.added))
        except ValueError as err:
            raise ProtocolError(f"its decrypted sum: {err}") from None

    def close(self) -> None:
        """End the open stage with what arrived (decrypt: ask the next client unless the sum came back);
        RoundAborted when the round cannot go on."""
        s = self.setup
        if self.open_stage is None:
            raise ProtocolError("the round is over")
        if self.open_stage == "upload":
            self.summed, self.added = _add(s, self.public, self.uploads)
            if len(self.added) < s.min_uploads:
                self.stage = len(STAGES)
                raise RoundAborted(f"round {s.round}: only {len(self.added)} of {len(s.participants)} clients' "
                                   f"uploads are in the sum; the round needs {s.min_uploads}")
            self.stage = 1
        elif self.total is not None:
            self.stage = len(STAGES)
            return
        left = [u for u in self.added if u not in self.asked]
        if self.asked:
            log.warning("round %d: client %d did not return the decrypted sum%s", s.round, self.holder,
                        f"; asking client {left[0]}" if left else "")
        if not left:
            self.stage = len(STAGES)
            raise RoundAborted(f"round {s.round}: none of the {len(self.added)} clients in the sum returned it "
                               "decrypted")
        self.holder = left[0]
        self.asked.append(self.holder)

    def ready(self, stage: str, client: int) -> bool:
        """Whether ``client``'s call for ``stage`` can be answered: an upload once the client is asked to
        decrypt, or is not in the sum, or the round is over."""
        if stage != "upload":
            return True
        return self.stage > 0 and (client == self.holder or client not in self.added or self.open_stage is None)

    def reply(self, stage: str, client: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if stage == "upload":
            if client not in self.added:
                return {"excluded": "its upload is not in the sum"}, {}
            if client == self.holder and self.open_stage == "decrypt":
                return {"decrypt": True, "clients": len(self.added)}, self.summed
        return {"done": True}, {}

    def result(self) -> Aggregate:
        if self.total is None:
            raise ProtocolError(f"the round is at stage {self.open_stage!r}, not finished")
        return Aggregate(self.total, list(self.added), [])


class CkksClient:
    """One participant's side of one round: it checks the setup against the model it was sent and its
    key, encrypts its update, and decrypts the sum when asked."""

    stages = STAGES
    result_stage = "upload"

    def __init__(self, setup: CkksSetup, me: int, weights: torch.Tensor, encrypt_context: bytes,
                 secret_context: bytes):
        if me not in setup.participants:
            raise ProtocolError(f"client {me} is not a participant of round {setup.round}")
        if model_hash(weights) != setup.model_hash:
            raise ProtocolError(f"round {setup.round}: the weights received do not match the model hash the "
                                "round announced; refusing it")
        self.setup = setup
        self._encrypt, self._secret = encrypt_context, secret_context
        self._uploaded = self._decrypted = False

    def message(self, stage: str, meta: dict[str, Any], reply: dict[str, torch.Tensor],
                update: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What this client sends at ``stage``, given the server's last reply."""
        return self.upload(update) if stage == "upload" else self.decrypt(meta, reply)

    def upload(self, update: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._uploaded:
            raise ProtocolError("this client has uploaded already")
        self._uploaded = True
        try:
            return ckks.encrypt(self._encrypt, self.setup.params, update)
        except ValueError as err:  # a context not for these parameters
            raise ProtocolError(f"cannot encrypt for the round's parameters: {err}") from None

    def decrypt(self, meta: dict[str, Any], summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum the server sent, decrypted. It refuses a sum said to hold fewer clients than the
        round's minimum (which would be a few clients' updates), or more than took part."""
        s, clients = self.setup, meta.get("clients")
        if not self._uploaded or self._decrypted:
            raise ProtocolError("a sum to decrypt comes once, after this client's upload")
        if not _is_int(clients) or not s.min_uploads <= clients <= len(s.participants):
            raise ProtocolError(f"a sum of {clients!r} clients; the round's sums hold {s.min_uploads} to "
                                f"{len(s.participants)}")
        self._decrypted = True
        try:
            ckks.check(s.params, summed, s.numel)
            return {"sum": ckks.decrypt(self._secret, s.params, summed, s.numel, clients)}
        except ValueError as err:
            raise ProtocolError(str(err)) from None

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
