"""Aggregation the server cannot read client by client: SecAgg+ (``secagg``) and CKKS (``ckks``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.fl.config import FlRunConfig


def grpc_mechanism(cfg: FlRunConfig, he_key: str | Path | None, *, server: bool) -> Any:
    """``fl.secure``'s mechanism for ``shoal fl server`` or ``client``, with this process's key file taken
    where it needs one (the server's public key, a client's secret one); None without fl.secure.
    ValueError says what is missing or wrong."""
    spec = cfg.fl.secure
    if spec is None:
        if he_key is not None:
            raise ValueError("--he-key is for fl.secure=ckks; this config has no fl.secure")
        return None
    if not spec.target.runs_over_grpc:
        raise ValueError(f"fl.secure={spec.name} does not run over gRPC; run it with `shoal fl simulate`")
    mechanism = spec.target(spec.options)
    if not mechanism.needs_keys:
        if he_key is not None:
            raise ValueError(f"--he-key: fl.secure={spec.name} makes its keys in every round and takes no key file")
        return mechanism
    if he_key is None:
        which = "the public key (ckks-public.key)" if server else "the secret key (ckks-secret.key)"
        raise ValueError(f"fl.secure={spec.name}: pass --he-key with {which} from `shoal fl keys`")
    mechanism.use_key(he_key, server=server, clients_per_round=cfg.fl.clients_per_round)
    return mechanism
