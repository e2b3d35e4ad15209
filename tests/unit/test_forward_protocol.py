"""The forward proxy protocol on fakes: detection, auth before connect, deadlines."""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from wmproxy_tw.config import load_text
from wmproxy_tw.forward.server import ForwardFactory


def _proto(extra: str = "") -> tuple[object, StringTransport, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    cfg = load_text(f'[proxy]\nbind = "127.0.0.1:0"\n{extra}').config.proxy
    f = ForwardFactory(reactor, cfg)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                        hostAddress=IPv4Address("TCP", "127.0.0.1", 8090))
    p.makeConnection(t)
    return p, t, reactor


def test_socks5_fed_byte_by_byte_connects_once() -> None:
    """A SOCKS5 CONNECT fed one byte at a time opens exactly one upstream connection."""
    p, t, reactor = _proto()
    for byte in b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50":
        p.dataReceived(bytes([byte]))
    assert t.value() == b"\x05\x00"
    assert [(h, port) for h, port, *_ in reactor.tcpClients] == [("127.0.0.1", 80)]


def test_credentials_checked_before_connecting() -> None:
    """Without valid Proxy-Authorization no upstream connection is attempted (407)."""
    p, t, reactor = _proto('username = "u"\npassword = "p"')
    p.dataReceived(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="wmproxy"' in t.value()
    assert reactor.tcpClients == []


def test_valid_credentials_connect() -> None:
    """With valid credentials the CONNECT target is dialled."""
    p, _t, reactor = _proto('username = "u"\npassword = "p"')
    cred = base64.b64encode(b"u:p").decode()
    p.dataReceived(f"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
    assert [(h, port) for h, port, *_ in reactor.tcpClients] == [("127.0.0.1", 443)]


def test_silent_client_is_closed_at_header_deadline() -> None:
    """A client that sends nothing is dropped when the header deadline passes."""
    _p, t, reactor = _proto('header_timeout = "2s"')
    reactor.advance(1.9)
    assert not t.disconnecting
    reactor.advance(0.2)
    assert t.disconnecting or t.disconnected


def test_flag_restricts_protocols() -> None:
    """With flag = "http" a SOCKS5 greeting is refused without a reply."""
    p, t, reactor = _proto('flag = "http"')
    p.dataReceived(b"\x05\x01\x00")
    assert t.value() == b"" and reactor.tcpClients == []


def test_origin_closing_mid_body_sends_what_came_then_closes_and_aborts_later() -> None:
    """An origin that closes inside a Content-Length body: the client gets the head and the bytes that
    came, then a close (not an abort that would drop them); a client that never drains is aborted
    after CLOSE_GRACE."""
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    from wmproxy_tw.relay import CLOSE_GRACE

    p, t, reactor = _proto()
    p.dataReceived(b"GET http://127.0.0.1:8080/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
    _h, _port, factory, *_ = reactor.tcpClients[0]
    up = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    up_t = StringTransport()
    up.makeConnection(up_t)
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    up.connectionLost(Failure(ConnectionDone()))
    assert t.value().endswith(b"\r\n\r\n" + b"x" * 10) and t.disconnecting
    aborted: list[bool] = []
    t.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    reactor.advance(CLOSE_GRACE)
    assert aborted == [True]


def test_ambiguous_body_framing_is_refused_before_connecting() -> None:
    """CL+TE, differing Content-Lengths and an obfuscated TE get 400 and no upstream connection
    (h11 took CL+TE as chunked and forwarded both fields: a desync for an upstream trusting CL);
    h11 itself answers 501 to a coding other than chunked."""
    for framing in (b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
                    b"Content-Length: 4\r\nContent-Length: 45\r\n",
                    b"Transfer-Encoding: chunked, identity\r\n"):
        p, t, reactor = _proto()
        p.dataReceived(b"POST http://127.0.0.1:8080/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + framing + b"\r\n")
        assert t.value()[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.1 501 "), (framing, t.value())
        assert reactor.tcpClients == [] and t.disconnecting
