"""CKKS key files for ``fl.secure: ckks`` over gRPC: who holds which key, handed out of band.

``shoal fl keys CONFIG --out DIR`` sizes the CKKS parameters for the config's ``clients_per_round``
and writes two files:

- ``ckks-secret.key`` (mode 0600): the secret context, for the clients. Every client holds the
  same secret key: any of them can decrypt any upload it sees, and the one the server asks
  decrypts the round's sum.
- ``ckks-public.key``: the context without the secret key, for the server, which adds
  ciphertexts and cannot decrypt them.

A file is one :mod:`shoal.fl.wire` message (never pickle): a header naming the format, whether
the context holds the secret key and the parameters it was made for, and the TenSEAL context's
bytes. Reading one checks all of that against the context itself, so a renamed public file is not
taken for a secret one, nor a key made for other settings used for a round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.fl import wire
from shoal.fl.certs import write_atomic
from shoal.fl.secure import ckks

FORMAT = "shoal-ckks-key"
SECRET_FILE = "ckks-secret.key"
PUBLIC_FILE = "ckks-public.key"
MAX_KEY_BYTES = 64 << 20  # a secret context at N = 32768 with the largest modulus is about 20 MB


@dataclass(frozen=True)
class CkksKey:
    params: ckks.CkksParams
    context: bytes  # TenSEAL's serialised context
    secret: bool  # whether it holds the secret key


def params_meta(params: ckks.CkksParams) -> dict[str, Any]:
    return {**dataclasses.asdict(params), "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes)}


def params_from_meta(meta: Any) -> ckks.CkksParams:
    """CKKS parameters from a header or a round's setup; ValueError says what does not fit."""
    names = {f.name for f in dataclasses.fields(ckks.CkksParams)}
    if not isinstance(meta, dict) or set(meta) != names:
        raise ValueError(f"CKKS parameters must have exactly the keys {sorted(names)}")
    if not isinstance(meta["coeff_mod_bit_sizes"], list) or not isinstance(meta["public_key_encryption"], bool):
        raise ValueError("CKKS parameters: coeff_mod_bit_sizes must be a list, public_key_encryption a boolean")
    return ckks.CkksParams(**meta)  # checks every bound itself


def make_keys(params: ckks.CkksParams, out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair for ``params`` to ``out``: (secret file, public file)."""
    out = Path(out)
    secret_path, public_path = out / SECRET_FILE, out / PUBLIC_FILE
    if not force and (secret_path.exists() or public_path.exists()):
        raise ValueError(f"{out} already holds CKKS keys; pass --force to replace them (the clients and the server "
                         "must then all be given the new ones)")
    out.mkdir(parents=True, exist_ok=True)
    secret, public = ckks.keygen(params)
    for path, blob, holds_secret in ((secret_path, secret, True), (public_path, public, False)):
        header = {"format": FORMAT, "secret": holds_secret, "params": params_meta(params)}
        write_atomic(path, wire.pack(header, {"context": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}),
                     private=holds_secret)
    return secret_path, public_path


def read_key(path: str | Path) -> CkksKey:
    """A key file from :func:`make_keys`, checked; ValueError names the file and what is wrong."""
    path = Path(path)
    try:
        meta, tensors = wire.unpack(path.read_bytes(), max_bytes=MAX_KEY_BYTES)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it: {err.strerror}") from None
    except wire.WireError as err:
        raise ValueError(f"{path}: not a CKKS key file from `shoal fl keys` ({err})") from None
    if meta.get("format") != FORMAT or set(meta) != {"format", "secret", "params"} or set(tensors) != {"context"} \
            or not isinstance(meta["secret"], bool):
        raise ValueError(f"{path}: not a CKKS key file from `shoal fl keys`")
    try:
        params = params_from_meta(meta["params"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    context = tensors["context"]
    if context.dtype != torch.uint8 or context.dim() != 1:
        raise ValueError(f"{path}: the context must be bytes")
    blob = context.numpy().tobytes()
    try:
        holds_secret = ckks.holds_secret_key(blob, params)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if holds_secret != meta["secret"]:
        raise ValueError(f"{path}: its header says {'secret' if meta['secret'] else 'public'} key, its context "
                         f"{'holds' if holds_secret else 'lacks'} the secret key")
    return CkksKey(params, blob, holds_secret)
