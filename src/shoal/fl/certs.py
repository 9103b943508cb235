"""TLS material for one federation: a private CA, a server and its clients.

The server and clients authenticate each other (mutual TLS) with certificates
signed by a CA that belongs to this federation alone, so a certificate is the
admission ticket and its common name is the client's identity (the server
also requires it to be the name of the client's token). ``make_certs``
writes everything a small federation needs, one folder for each party, so
that what a party is handed holds its own key and nothing else::

    ca.pem, ca.key                            the self-signed CA: stays with
                                              whoever issues certificates
    server/ca.pem, server.pem, server.key     serverAuth, SAN = the hosts
                                              clients dial
    NAME/ca.pem, NAME.pem, NAME.key           clientAuth, CN = NAME, one
                                              folder per client

Keys are ECDSA P-256 in PEM (PKCS#8, unencrypted), private key files are mode
0600, and every file is written atomically (temporary file, then rename).
``ca.key`` is written last, so its presence means a complete set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("shoal.fl")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RESERVED = {"ca", "server"}


def make_certs(
    out: Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: int | Sequence[str] = ("client",),
    days: int = 365,
    force: bool = False,
) -> dict[str, Path]:
    """Write a CA into ``out``, and the server's and each client's folder under it.

    ``hosts`` are the DNS names and IP addresses clients use to reach the
    server. ``clients`` is a list of names or a count ``N`` meaning
    ``client1`` .. ``clientN``. Returns ``{relative path: path}`` for every
    file written (``ca.key``, ``server/server.pem``, ``alice/alice.key``, ...).
    An existing ``ca.key`` is never overwritten unless ``force``.
    """
    out = Path(out)
    if isinstance(hosts, str):
        raise TypeError(f"hosts must be a list of names or addresses, got the string {hosts!r}")
    hosts = list(hosts)
    names = _client_names(clients)
    if not hosts:
        raise ValueError("hosts must name at least one DNS name or IP address the server is reached at")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if (out / "ca.key").exists() and not force:
        raise ValueError(
            f"{out / 'ca.key'} exists; refusing to replace this federation's CA "
            "(every issued certificate would stop working). Pass force=True (--force) to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    # Backdated a few minutes so a peer whose clock is slightly behind accepts it.
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    written: dict[str, Path] = {}
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    san = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
    leaves = [("server", hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, san)]
    leaves += [(name, name, ExtendedKeyUsageOID.CLIENT_AUTH, None) for name in names]
    for stem, common_name, usage, alt_names in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            _builder(subject, ca_name, key.public_key(), valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if alt_names is not None:
            builder = builder.add_extension(alt_names, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        folder = out / stem
        folder.mkdir(exist_ok=True)
        for name, data, private in ((f"{stem}.key", _key_pem(key), True),
                                    (f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), False),
                                    ("ca.pem", ca_pem, False)):
            written[f"{stem}/{name}"] = write_atomic(folder / name, data, private=private)
    written["ca.pem"] = write_atomic(out / "ca.pem", ca_pem)
    written["ca.key"] = write_atomic(out / "ca.key", _key_pem(ca_key), private=True)
    return written


@dataclass(frozen=True)
class TlsFiles:
    """The three files one side of a mutual-TLS connection needs."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def server(cls, directory: Path) -> TlsFiles:
        """The server's files: ``directory/server/`` as ``make_certs`` writes it, or
        ``directory`` itself when it holds ``server.pem`` (a folder handed to the server)."""
        directory = Path(directory)
        if (directory / "server" / "server.pem").is_file():
            directory = directory / "server"
        return cls._existing(directory, "server")

    @classmethod
    def client(cls, directory: Path, name: str | None = None) -> TlsFiles:
        """A client's files from its folder (``make_certs``'s ``OUT/NAME``).

        Without ``name`` the folder must hold exactly one client's pair. A
        folder that also holds the CA's key is used, with a warning: whoever
        has that key can mint certificates for any client.
        """
        directory = Path(directory)
        if name is None:
            stems = sorted(p.stem for p in directory.glob("*.key") if p.stem != "ca")
            if len(stems) != 1:
                found = ", ".join(f"{s}.key" for s in stems) or "none"
                raise ValueError(f"{directory} must hold one client's NAME.pem/NAME.key (found: {found}); "
                                 "pass the folder `shoal fl certs` wrote for this client, OUT/NAME, or its --name")
            name = stems[0]
        elif not (directory / f"{name}.pem").is_file() and (directory / name / f"{name}.pem").is_file():
            directory = directory / name
        files = cls._existing(directory, name)
        if (directory / "ca.key").exists():
            log.warning("%s holds the federation CA's key (ca.key): a client needs only its own folder "
                        "(OUT/%s from `shoal fl certs`); whoever holds ca.key can mint certificates", directory, name)
        return files

    @classmethod
    def _existing(cls, directory: Path, stem: str) -> TlsFiles:
        files = cls(ca=directory / "ca.pem", cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
        for path in (files.ca, files.cert, files.key):
            if not path.is_file():
                raise ValueError(f"missing TLS file {path}; `shoal fl certs --out DIR --client {stem}` makes "
                                 f"DIR/{stem}/ with it")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca, cert, key)`` as PEM bytes, the form gRPC's credentials take."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def _client_names(clients: int | Sequence[str]) -> list[str]:
    if isinstance(clients, str):
        raise TypeError(f"clients must be a count or a list of names, got the string {clients!r}")
    if isinstance(clients, int):
        if clients < 1:
            raise ValueError(f"clients must be at least 1, got {clients}")
        return [f"client{i}" for i in range(1, clients + 1)]
    names = list(clients)
    if not names:
        raise ValueError("clients must name at least one client")
    for name in names:
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(
                f"client name {name!r} must be 1-64 letters, digits, '_', '.', '-' "
                f"(not starting with '.' or '-') and not one of {sorted(_RESERVED)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"client names repeat: {names}")
    return names


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    valid: tuple[dt.datetime, dt.datetime],
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; ``private``: readable by the owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file 0600, so a private key is never readable by others.
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
