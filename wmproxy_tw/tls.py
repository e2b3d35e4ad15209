"""The one TLS-context builder: servers (SNI, several certificates), clients (verified).

Certificates are read once, when the feature is built, never per connection.
Any unreadable or mismatched file raises :class:`TLSConfigError` naming the
file, which start-up turns into one line and exit status 1.  There is no
built-in certificate and no silent fallback to cleartext.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["TLSConfigError", "CertKey", "load_cert_key", "server_creator", "client_creator"]

_log = Logger()


class TLSConfigError(Exception):
    """A certificate, key or CA file could not be used."""


@dataclass(frozen=True)
class CertKey:
    """A loaded certificate chain and key, with the host names it covers."""

    cert: Any  # cryptography x509.Certificate (leaf)
    chain: tuple[Any, ...]
    key: Any  # cryptography private key
    names: tuple[str, ...]
    path: str


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_cert_key(cert_path: str, key_path: str) -> CertKey:
    """Load a PEM chain (leaf first) and its private key; check they match."""
    from cryptography import x509

    data = _read(cert_path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{cert_path}: not a PEM certificate: {e}") from None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(_read(key_path, "key"), password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{key_path}: not a PEM private key (or it is encrypted): {e}") from None
    leaf = certs[0]
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate(leaf)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{key_path} is not the key of {cert_path}") from None
    names: list[str] = []
    try:
        san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    cn = [a.value for a in certs[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    names += [str(v).lower() for v in cn if str(v).lower() not in names]
    chain = tuple(certs[1:])
    return CertKey(leaf, chain, key, tuple(names), cert_path)


def _matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == pattern[2:]
    return False


def _load_ca(ctx: SSL.Context, ca_path: str) -> None:
    _read(ca_path, "CA file")
    try:
        ctx.load_verify_locations(ca_path)
    except SSL.Error as e:
        raise TLSConfigError(f"{ca_path}: not a PEM CA bundle: {e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, contexts: list[tuple[CertKey, SSL.Context]], default: SSL.Context) -> None:
        self.contexts = contexts
        self.default = default

    def pick(self, name: Optional[str]) -> SSL.Context:
        if name:
            host = name.lower().rstrip(".")
            for ck, ctx in self.contexts:
                if any(_matches(n, host) for n in ck.names):
                    return ctx
        return self.default

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.default, None)


def _server_context(ck: CertKey, alpn: Sequence[bytes], client_ca: Optional[str]) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.use_certificate(ck.cert)
    for extra in ck.chain:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(ck.key)
    ctx.set_session_id(b"wmproxy-tw")
    if alpn:
        protos = list(alpn)

        def select(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
            for p in protos:
                if p in offered:
                    return p
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        ctx.set_alpn_select_callback(select)
    if client_ca:
        _load_ca(ctx, client_ca)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: bool(a[-1]))
    return ctx


def server_creator(
    pairs: Iterable[tuple[str, str]],
    alpn: Sequence[bytes] = (),
    client_ca: Optional[str] = None,
) -> IOpenSSLServerConnectionCreator:
    """A server TLS creator for one port: the first pair is the default
    (unknown or absent SNI); others are chosen by SNI against their names.
    ``client_ca`` turns on mutual TLS (clients must present a certificate
    signed by it)."""
    loaded = []
    for cert_path, key_path in pairs:
        ck = load_cert_key(cert_path, key_path)
        loaded.append((ck, _server_context(ck, alpn, client_ca)))
    if not loaded:
        raise TLSConfigError("a TLS listener needs at least one cert/key pair")
    creator = _ServerCreator(loaded, loaded[0][1])

    def on_sni(conn: SSL.Connection) -> None:
        name = conn.get_servername()
        ctx = creator.pick(name.decode("ascii", "replace") if name else None)
        if ctx is not creator.default:
            conn.set_context(ctx)

    for _ck, ctx in loaded:
        ctx.set_tlsext_servername_callback(on_sni)
    return creator


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """Client TLS without certificate checks: only by explicit operator choice."""

    def __init__(self, hostname: str, alpn: Sequence[bytes], cert: Optional[CertKey]) -> None:
        self.hostname = hostname
        self.ctx = SSL.Context(SSL.TLS_METHOD)
        self.ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if alpn:
            self.ctx.set_alpn_protos(list(alpn))
        if cert is not None:
            self.ctx.use_certificate(cert.cert)
            self.ctx.use_privatekey(cert.key)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        if self.hostname and not _is_ip(self.hostname):
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        conn.set_connect_state()
        return conn


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def client_creator(
    hostname: str,
    ca_path: Optional[str] = None,
    verify: bool = True,
    client_cert: Optional[tuple[str, str]] = None,
    alpn: Sequence[bytes] = (),
) -> IOpenSSLClientConnectionCreator:
    """Client TLS that verifies ``hostname`` against the system CAs or ``ca_path``.

    ``verify=False`` only when the operator configured it (logged once here).
    ``client_cert`` is the (cert, key) pair for mutual TLS.
    """
    ck = load_cert_key(*client_cert) if client_cert else None
    if not verify:
        _log.warn("TLS verification of {host} is off (configured)", host=hostname)
        return _Unverified(hostname, alpn, ck)
    trust = None
    if ca_path:
        data = _read(ca_path, "CA file")
        try:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(block) for block in _pem_blocks(data)]
            )
        except (crypto.Error, ValueError, IndexError) as e:
            raise TLSConfigError(f"{ca_path}: not a PEM CA bundle: {e}") from None
    client = None
    if ck is not None:
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(ck.cert)),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(ck.key)),
        )
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=client,
        acceptableProtocols=list(alpn) or None,
    )


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError("no certificate found")
    return blocks
