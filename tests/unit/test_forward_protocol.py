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
    """CL+TE, differing Content-Lengths and an obfuscated TE get 400 (or 501 for an unknown coding)
    and no upstream connection: forwarding both fields would desync an upstream trusting CL."""
    for framing in (b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
                    b"Content-Length: 4\r\nContent-Length: 45\r\n",
                    b"Transfer-Encoding: chunked, identity\r\n"):
        p, t, reactor = _proto()
        p.dataReceived(b"POST http://127.0.0.1:8080/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + framing + b"\r\n")
        assert t.value()[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.1 501 "), (framing, t.value())
        assert reactor.tcpClients == [] and t.disconnecting


def _dial(reactor: MemoryReactorClock, i: int = -1) -> tuple[object, StringTransport]:
    """Complete the i-th upstream connection the proxy started: its protocol and transport."""
    host, port, factory, *_ = reactor.tcpClients[i]
    up = factory.buildProtocol(IPv4Address("TCP", host, port))
    ut = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    up.makeConnection(ut)
    return up, ut


_GET = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: h\r\n\r\n"


def _exchange(response: bytes, lost: bool = False, request: bytes = _GET) -> tuple[object, StringTransport, object]:
    """A request through a fresh proxy, answered upstream with ``response`` (then a close, if ``lost``)."""
    p, t, reactor = _proto()
    p.dataReceived(request)
    up, ut = _dial(reactor)
    up.dataReceived(response)
    if lost:
        up.connectionLost(None)
    return p, t, (reactor, up, ut)


def test_chunked_upload_and_chunked_response_keep_alive() -> None:
    """A chunked request body goes upstream re-chunked; the chunked answer comes back; the next request reuses it."""
    p, t, reactor = _proto()
    p.dataReceived(b"POST http://127.0.0.1:9/up HTTP/1.1\r\nHost: 127.0.0.1:9\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n")
    up, ut = _dial(reactor)
    p.dataReceived(b"2;x=1\r\nde\r\n0\r\nTrailer: t\r\n\r\n")
    sent = ut.value()
    assert sent.startswith(b"POST /up HTTP/1.1\r\nHost: 127.0.0.1:9\r\n") and b"Via: 1.1 wmproxy-tw\r\n" in sent
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 200 OK\r\n") and t.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    ut.clear()
    p.dataReceived(b"GET http://127.0.0.1:9/two HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
    assert len(reactor.tcpClients) == 1 and ut.value().startswith(b"GET /two HTTP/1.1\r\n")


def test_pipelined_requests_are_answered_in_order() -> None:
    """Two requests in one write: the second goes upstream only after the first response has ended."""
    p, t, reactor = _proto()
    p.dataReceived(b"GET http://127.0.0.1:9/a HTTP/1.1\r\nHost: h\r\n\r\nGET http://127.0.0.1:9/b HTTP/1.1\r\nHost: h\r\n\r\n")
    up, ut = _dial(reactor)
    assert ut.value().count(b"GET ") == 1
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    assert ut.value().count(b"GET ") == 2 and b"GET /b " in ut.value()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    assert t.value().count(b"HTTP/1.1 200 OK") == 2 and t.value().endswith(b"B") and not t.disconnecting


def test_http10_client_and_close_delimited_response() -> None:
    """An HTTP/1.0 client gets a close-delimited body as is; the proxy closes after it; Host is added."""
    p, t, reactor = _proto()
    p.dataReceived(b"GET http://127.0.0.1:9/ HTTP/1.0\r\n\r\n")
    up, ut = _dial(reactor)
    assert b"\r\nHost: 127.0.0.1:9\r\n" in ut.value()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ")
    up.dataReceived(b"body")
    up.connectionLost(None)
    out = t.value()
    assert b"Connection: close\r\n" in out and b"chunked" not in out and out.endswith(b"\r\n\r\nsome body")
    assert t.disconnecting


def test_close_delimited_response_is_chunked_for_http11_client() -> None:
    """A close-delimited upstream body reaches an HTTP/1.1 client chunked, keeping the client connection."""
    _p, t, _ = _exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nxyz", lost=True)
    assert b"Transfer-Encoding: chunked\r\n" in t.value() and t.value().endswith(b"\r\n\r\n3\r\nxyz\r\n0\r\n\r\n")
    assert not t.disconnecting


def test_head_response_has_no_body() -> None:
    """A HEAD answer with Content-Length carries no body; the connection serves the next request."""
    p, t, (reactor, _up, ut) = _exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                                         request=_GET.replace(b"GET", b"HEAD"))
    assert t.value().endswith(b"Content-Length: 100\r\nVia: 1.1 wmproxy-tw\r\n\r\n")
    p.dataReceived(b"GET http://127.0.0.1:9/n HTTP/1.1\r\nHost: h\r\n\r\n")
    assert b"GET /n " in ut.value() and len(reactor.tcpClients) == 1


def test_truncated_upstream_body_aborts_the_client() -> None:
    """An upstream that closes before its Content-Length is reached makes the proxy abort, not end cleanly."""
    _p, t, _ = _exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", lost=True)
    assert t.disconnecting and t.value().endswith(b"abc")


def test_bad_upstream_response_is_502() -> None:
    """A malformed response head becomes 502 for the client."""
    _p, t, _ = _exchange(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 502 ")


def test_websocket_upgrade_becomes_a_relay() -> None:
    """A 101 to a WebSocket upgrade passes through; then bytes flow both ways unparsed."""
    p, t, reactor = _proto()
    p.dataReceived(b"GET http://127.0.0.1:9/ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    up, ut = _dial(reactor)
    assert b"Upgrade: websocket\r\n" in ut.value() and b"Connection: Upgrade\r\n" in ut.value()
    up.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nfrom-up")
    assert b"101 Switching Protocols" in t.value() and t.value().endswith(b"from-up")
    ut.clear()
    p.dataReceived(b"from-client")
    assert ut.value() == b"from-client"


def test_response_deadline_gives_504() -> None:
    """An upstream that accepts the request but never answers gets the client a 504."""
    p, t, reactor = _proto()
    p.dataReceived(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: h\r\n\r\n")
    _up, _ut = _dial(reactor)
    reactor.advance(61)
    assert t.value().startswith(b"HTTP/1.1 504 ")


def _client(f: ForwardFactory) -> tuple[object, StringTransport]:
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                        hostAddress=IPv4Address("TCP", "127.0.0.1", 8090))
    p.makeConnection(t)
    return p, t


def _pool_setup() -> tuple[ForwardFactory, MemoryReactorClock, object, StringTransport, object]:
    """A first HTTP/1.0 client served and gone: its upstream connection is parked."""
    reactor = MemoryReactorClock()
    f = ForwardFactory(reactor, load_text('[proxy]\nbind = "127.0.0.1:0"').config.proxy)
    p1, t1 = _client(f)
    p1.dataReceived(b"GET http://127.0.0.1:9/a HTTP/1.0\r\n\r\n")
    up, ut = _dial(reactor)
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    assert t1.disconnecting and t1.value().endswith(b"\r\n\r\nA")
    p1.connectionLost(None)
    ut.clear()
    return f, reactor, up, ut, p1


def test_upstream_connection_is_pooled_between_clients() -> None:
    """A second client's request to the same origin goes over the first one's upstream connection."""
    f, reactor, up, ut, _ = _pool_setup()
    p2, t2 = _client(f)
    p2.dataReceived(b"GET http://127.0.0.1:9/b HTTP/1.0\r\n\r\n")
    assert len(reactor.tcpClients) == 1 and ut.value().startswith(b"GET /b HTTP/1.1\r\n")
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    assert t2.value().endswith(b"\r\n\r\nB")


def test_pooled_connection_closed_by_origin_is_dropped() -> None:
    """An idle pooled connection the origin closes is forgotten; the next request dials anew."""
    f, reactor, up, _ut, _ = _pool_setup()
    up.connectionLost(None)
    p2, _t2 = _client(f)
    p2.dataReceived(b"GET http://127.0.0.1:9/b HTTP/1.0\r\n\r\n")
    assert len(reactor.tcpClients) == 2 and f.pool.count == 0


def test_reused_connection_closing_before_the_answer_is_retried() -> None:
    """A reused connection that closes before any byte of answer: the request is resent on a new one."""
    f, reactor, up, ut, _ = _pool_setup()
    p2, t2 = _client(f)
    p2.dataReceived(b"GET http://127.0.0.1:9/b HTTP/1.0\r\n\r\n")
    assert ut.value().startswith(b"GET /b ")
    up.connectionLost(None)
    up2, ut2 = _dial(reactor)
    assert ut2.value().startswith(b"GET /b HTTP/1.1\r\n")
    up2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    assert t2.value().startswith(b"HTTP/1.1 200 OK") and t2.value().endswith(b"B")


def test_request_with_body_does_not_take_a_pooled_connection() -> None:
    """A POST is never sent on a pooled connection (its body could not be resent)."""
    f, reactor, _up, ut, _ = _pool_setup()
    p2, _t2 = _client(f)
    p2.dataReceived(b"POST http://127.0.0.1:9/b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    assert len(reactor.tcpClients) == 2 and ut.value() == b""


def test_non_idempotent_request_without_body_is_never_resent() -> None:
    """A bodiless POST or PATCH takes no pooled connection (RFC 9110 §9.2.2: it must not be sent twice)."""
    for method in (b"POST", b"PATCH"):
        f, reactor, _up, ut, _ = _pool_setup()
        p2, _t2 = _client(f)
        p2.dataReceived(method + b" http://127.0.0.1:9/b HTTP/1.0\r\n\r\n")
        assert len(reactor.tcpClients) == 2 and ut.value() == b"", method


def test_pool_closes_idle_connections_and_on_stop() -> None:
    """Pooled connections idle past POOL_IDLE are closed; stop() closes the rest."""
    f, reactor, _up, ut, _ = _pool_setup()
    reactor.advance(61)
    assert ut.disconnecting and f.pool.count == 0
    _f2, _reactor2, _up2, ut2, _ = _pool_setup()
    _f2.stop()
    assert ut2.disconnecting and _f2.pool.count == 0
