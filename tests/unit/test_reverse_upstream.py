"""Upstream connections and their keep-alive pool, on StringTransports and a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wmproxy_tw.reverse.upstream import UpstreamConnection, UpstreamPool


class User:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def upstream_response(self, head: Any) -> None:
        self.events.append(("response", head.status))

    def upstream_informational(self, head: Any) -> None:
        self.events.append(("info", head.status))

    def upstream_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def upstream_end(self) -> None:
        self.events.append(("end", None))

    def upstream_error(self, status: int, why: str) -> None:
        self.events.append(("error", status))

    def upstream_lost(self, reason: Any) -> None:
        self.events.append(("lost", None))

    def upstream_flush(self) -> None:
        pass


def connected(pool: UpstreamPool, key: Any = "k") -> tuple[UpstreamConnection, StringTransport]:
    conn = UpstreamConnection(pool, key)
    t = StringTransport()
    conn.makeConnection(t)
    return conn, t


def exchange(conn: UpstreamConnection, response: bytes) -> User:
    user = User()
    conn.user = user
    conn.send_head(b"GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None)
    conn.dataReceived(response)
    return user


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def test_complete_exchange_is_pooled_and_reused_lifo() -> None:
    """A connection whose exchange ended cleanly goes back to the pool; the newest is reused first."""
    pool = UpstreamPool(Clock())
    c1, _ = connected(pool)
    c2, _ = connected(pool)
    for c in (c1, c2):
        user = exchange(c, OK)
        assert user.events == [("response", 200), ("data", b"hi"), ("end", None)]
        pool.release(c)
    assert pool.acquire("k") is c2 and pool.acquire("k") is c1 and pool.acquire("k") is None


def test_connection_paused_by_the_last_client_is_resumed_when_pooled() -> None:
    """Back-pressure from the previous client must not leave an idle connection deaf."""
    pool = UpstreamPool(Clock())
    conn, t = connected(pool)
    exchange(conn, OK)
    conn.pause_reading()  # what the client's back-pressure does (the exchange's response pump)
    assert t.producerState == "paused"
    pool.release(conn)
    assert t.producerState == "producing"


def test_unclean_connections_are_closed_not_pooled() -> None:
    """Connection: close, an unfinished request body, or extra bytes after the response: closed."""
    for response, finish_body in ((b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
                                  (OK, False), (OK + b"junk", True)):
        pool = UpstreamPool(Clock())
        conn, t = connected(pool)
        conn.user = User()
        conn.send_head(b"POST", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked")
        if finish_body:
            conn.end_body()
        conn.dataReceived(response)
        pool.release(conn)
        assert t.disconnecting and pool.acquire("k") is None


def test_idle_connections_are_closed_after_idle_timeout() -> None:
    """The pool closes connections idle for idle_timeout."""
    clock = Clock()
    pool = UpstreamPool(clock, idle_timeout=10)
    conn, t = connected(pool)
    exchange(conn, OK)
    pool.release(conn)
    clock.advance(9)
    assert not t.disconnecting
    clock.advance(2)
    assert t.disconnecting and pool.acquire("k") is None


def test_bytes_on_an_idle_connection_abort_it() -> None:
    """An idle upstream must stay silent: anything it sends makes the connection unusable."""
    pool = UpstreamPool(Clock())
    conn, t = connected(pool)
    exchange(conn, OK)
    pool.release(conn)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert conn.closed


def test_chunked_upload_framing_and_bad_response() -> None:
    """Request bodies are chunk-framed; a garbage answer reports 502 to the user and aborts."""
    pool = UpstreamPool(Clock())
    conn, t = connected(pool)
    user = User()
    conn.user = user
    conn.send_head(b"POST", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked")
    conn.send_body(b"abc")
    conn.end_body()
    assert t.value().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    conn.dataReceived(b"NOT HTTP\r\n\r\n")
    assert user.events == [("error", 502)] and conn.closed


def test_eager_write_sends_at_once_and_keeps_order() -> None:
    """eager_write sends at once on an idle tcp.Connection (over a socket pair); with bytes queued it queues behind them;
    other transports get an ordinary write."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol

    from wmproxy_tw.reverse.wire import eager_write

    class FakeReactor:
        def addReader(self, _r: Any) -> None: ...
        def addWriter(self, _w: Any) -> None: self.writing = True
        def removeReader(self, _r: Any) -> None: ...
        def removeWriter(self, _w: Any) -> None: ...

    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    reactor = FakeReactor()
    conn = tcp.Connection(a, Protocol(), reactor)  # type: ignore[arg-type]
    conn.connected = True
    try:
        eager_write(conn, b"one ")
        assert b.recv(100) == b"one " and not getattr(reactor, "writing", False)
        conn.write(b"two ")  # queued, waiting for the reactor
        eager_write(conn, b"three")
        assert conn._tempDataBuffer == [b"two ", b"three"]  # behind what was queued, in order
        t = StringTransport()
        eager_write(t, b"x")
        assert t.value() == b"x"
    finally:
        a.close()
        b.close()
