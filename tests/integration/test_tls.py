"""The TLS builder: SNI picks the certificate, clients verify by name, bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from wmproxy_tw.tls import TLSConfigError, client_creator, load_cert_key, server_creator

from ..helpers import Echo
from ..tlsutil import make_cert

pytestmark = pytest.mark.integration


class Once(Protocol):
    def __init__(self) -> None:
        self.got: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"hi")

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(data)
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.got.called:
            self.got.errback(reason)


async def _talk(port: int, creator: object) -> bytes:
    ep = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    proto = await ep.connect(Factory.forProtocol(Once))
    return await proto.got


@pytest_twisted.ensureDeferred
async def test_sni_selects_certificate(tmp_path: Path) -> None:
    """Two certificates on one port: each name gets its own; an unknown name gets the default."""
    a = make_cert(tmp_path, "a.test")
    b = make_cert(tmp_path, "b.test")
    f = TLSMemoryBIOFactory(server_creator([a, b]), False, Factory.forProtocol(Echo))
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    p = port.getHost().port
    try:
        assert await _talk(p, client_creator("a.test", ca_path=a[0])) == b"hi"
        assert await _talk(p, client_creator("b.test", ca_path=b[0])) == b"hi"
        # b.test's CA does not trust a.test's certificate: verification must fail
        with pytest.raises(SSL.Error):
            await _talk(p, client_creator("a.test", ca_path=b[0]))
        # unknown SNI → default (a.test) certificate, which a.test's CA verifies for name a.test only
        assert await _talk(p, client_creator("zzz.test", verify=False)) == b"hi"
    finally:
        await defer.maybeDeferred(port.stopListening)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    """A missing file, a non-PEM file and a mismatched key each raise TLSConfigError naming it."""
    a = make_cert(tmp_path, "a.test")
    b = make_cert(tmp_path, "b.test")
    with pytest.raises(TLSConfigError, match="nope.pem"):
        load_cert_key(str(tmp_path / "nope.pem"), a[1])
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(TLSConfigError, match="junk.pem"):
        load_cert_key(str(junk), a[1])
    with pytest.raises(TLSConfigError, match="is not the key of"):
        load_cert_key(a[0], b[1])
    assert load_cert_key(*a).names == ("a.test",)
