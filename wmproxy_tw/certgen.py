"""``wmproxy gen-cert``: a local CA plus server and client certificates, for tests and quick starts.

Nothing here is built into the proxy: the files are written once, into a folder the operator
names, and the configuration points at them (``cert``/``key``/``ca``, ``map_cert``/``map_key``).
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertFiles", "generate"]


@dataclass(frozen=True)
class CertFiles:
    """Paths of what :func:`generate` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          names: Iterable[str], usage: x509.ObjectIdentifier, days: int,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    sans = [_san(n) for n in dict.fromkeys(names)]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def generate(folder: str | Path, names: Iterable[str] = (), client_name: str = "wmproxy-client",
             days: int = 825, force: bool = False) -> CertFiles:
    """Write ``ca``, ``server`` and ``client`` ``.pem``/``.key`` files into ``folder``.

    The server certificate covers ``localhost``, ``127.0.0.1``, ``::1`` and ``names``; the client
    certificate (for ``two_way_tls``) is named ``client_name``.  Existing files are kept unless
    ``force``: raises :class:`FileExistsError` naming the first one.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    files = CertFiles(*(out / f"{who}.{ext}" for who in ("ca", "server", "client")
                        for ext in ("pem", "key")))
    if not force:
        for path in vars(files).values():
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wmproxy-tw local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names = list(names)
    server_cn = names[0] if names else "localhost"
    server, server_key = _leaf(ca, ca_key, server_cn, [*names, "localhost", "127.0.0.1", "::1"],
                               ExtendedKeyUsageOID.SERVER_AUTH, days)
    client, client_key = _leaf(ca, ca_key, client_name, [client_name],
                               ExtendedKeyUsageOID.CLIENT_AUTH, days)
    for cert, key, cert_path, key_path in ((ca, ca_key, files.ca_cert, files.ca_key),
                                           (server, server_key, files.server_cert, files.server_key),
                                           (client, client_key, files.client_cert, files.client_key)):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return files
