"""ALPNSwitch: one TLS connection becomes HTTP/2 or HTTP/1.1 by ALPN, bounded handshake."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import directlyProvides

from wmproxy_tw.reverse import http2

pytestmark = pytest.mark.skipif(not http2.h2_available(), reason="twisted[http2] not installed")


class H1(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


def tls_transport(alpn: bytes | None) -> StringTransport:
    t = StringTransport()
    directlyProvides(t, ISSLTransport)
    t.negotiatedProtocol = alpn  # type: ignore[attr-defined]
    t.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
    return t


def test_http11_after_handshake() -> None:
    """ALPN http/1.1 (or none): the HTTP/1.1 protocol gets the connection and every byte."""
    clock = Clock()
    h1 = H1()
    sw = http2.ALPNSwitch(server.Site(Resource()), lambda: h1, clock)
    t = tls_transport(b"http/1.1")
    sw.makeConnection(t)
    assert sw.chosen is None
    sw.handshakeCompleted()
    sw.dataReceived(b"GET / HTTP/1.1\r\n")
    assert sw.chosen is h1 and h1.data == b"GET / HTTP/1.1\r\n"
    sw.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_h2_gets_guarded_connection() -> None:
    """ALPN h2: a guarded H2Connection, registered as the transport's producer, sends its SETTINGS."""
    clock = Clock()
    sw = http2.ALPNSwitch(server.Site(Resource()), H1, clock)
    t = tls_transport(b"h2")
    sw.makeConnection(t)
    sw.handshakeCompleted()
    assert isinstance(sw.chosen, http2.guarded_h2_class())
    assert t.producer is sw.chosen and t.value()  # the server preface went out
    sw.connectionLost(None)


def test_handshake_timeout_aborts_and_cleartext_is_h1() -> None:
    """No handshake within the bound: aborted. A cleartext transport is HTTP/1.1 at once."""
    clock = Clock()
    t = tls_transport(None)
    sw = http2.ALPNSwitch(server.Site(Resource()), H1, clock, handshake_timeout=5)
    sw.makeConnection(t)
    clock.advance(5)
    assert t.disconnecting or getattr(t, "aborted", False) or t.disconnected
    plain = StringTransport()
    sw2 = http2.ALPNSwitch(server.Site(Resource()), H1, clock)
    sw2.makeConnection(plain)
    assert isinstance(sw2.chosen, H1)
