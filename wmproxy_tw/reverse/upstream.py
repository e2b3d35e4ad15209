"""Upstream HTTP/1.1 connections, kept alive in a pool per member.

:class:`UpstreamConnection` carries one request/response at a time, framed
by the sans-IO :class:`~wmproxy_tw.reverse.h1.ResponseParser` (and
:func:`~wmproxy_tw.reverse.h1.chunk` for chunked uploads), and reports
events to its current *user* (the proxy exchange): ``upstream_response``,
``upstream_informational``, ``upstream_data``, ``upstream_end``,
``upstream_error(status, reason)`` and ``upstream_lost(reason)``.  Between
requests it waits in the :class:`UpstreamPool` (LIFO, ``max_idle`` per key,
closed after ``idle_timeout``).  While a user waits for bytes it can
:meth:`~UpstreamConnection.watch` the connection: ``upstream_timeout()`` is
called after that long without a byte (not counting time paused by the
client's back-pressure).  Connections are opened by
:func:`wmproxy_tw.connect.connect` (async DNS, 502/504 classification),
wrapped in TLS when a client creator is given.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ..connect import connect, quiet_factory
from .h1 import DATA, END, INFO, LAST_CHUNK, RESPONSE, ResponseError, ResponseParser, chunk
from .wire import eager_write

__all__ = ["UpstreamConnection", "UpstreamPool", "MAX_RESPONSE_HEAD"]

#: Largest upstream response head accepted (larger → 502).
MAX_RESPONSE_HEAD = 64 * 1024
#: Idle connections kept per member.  Above the usual client concurrency: a
#: pool smaller than the number of requests in flight closes and reopens the
#: difference on every round (with 32 and 50 busy clients, a quarter of all
#: requests paid a TCP connect).
MAX_IDLE = 256


class UpstreamConnection(Protocol):
    """One HTTP/1.1 connection to an upstream member."""

    transport: Any

    def __init__(self, pool: "UpstreamPool", key: Hashable) -> None:
        self.pool = pool
        self.key = key
        self.parser = ResponseParser(max_head=MAX_RESPONSE_HEAD)
        self.user: Any = None
        self.closed = False
        self.splice: Any = None
        self.idle_since = 0.0
        self.served = 0
        self.request_done = True
        self._chunked = False
        self.clock = pool.reactor
        self._watch: Optional[float] = None
        self._last_read = 0.0
        self._timer: Any = None
        self.paused = False

    def connectionMade(self) -> None:
        t = self.transport
        if ITCPTransport.providedBy(t):
            t.setTcpNoDelay(True)

    # -- sending -------------------------------------------------------------------
    def send_head(self, method: bytes, head: bytes, body: Optional[str]) -> None:
        """Write a request head; ``body`` is None, "length" or "chunked"."""
        self.parser.expect(method)
        self._chunked = body == "chunked"
        self.request_done = body is None
        eager_write(self.transport, head)

    def send_body(self, data: bytes) -> None:
        if data:
            if self._chunked:
                self.transport.writeSequence(chunk(data))
            else:
                self.transport.write(data)

    def end_body(self) -> None:
        if self._chunked:
            self.transport.write(LAST_CHUNK)
        self.request_done = True

    @property
    def reusable(self) -> bool:
        return not self.closed and self.splice is None and self.request_done and self.parser.reusable

    # -- reading -------------------------------------------------------------------
    def watch(self, seconds: Optional[float]) -> None:
        """Call ``user.upstream_timeout()`` after ``seconds`` without a byte (None: stop)."""
        self._watch = seconds or None
        if self._watch is None:
            return
        self._last_read = self.clock.seconds()
        if self._timer is None:
            self._timer = self.clock.callLater(seconds, self._check)

    def _check(self) -> None:
        self._timer = None
        limit = self._watch
        if limit is None or self.closed or self.user is None:
            return
        now = self.clock.seconds()
        if self.paused:
            self._last_read = now
        left = self._last_read + limit - now
        if left > 0.001:
            self._timer = self.clock.callLater(left, self._check)
            return
        self._watch = None
        self.user.upstream_timeout()

    def pause_reading(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.paused = False
        self._last_read = self.clock.seconds()
        if self.transport is not None:
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(1, data)
            return
        self._last_read = self.clock.seconds()
        if self.user is None:
            # An idle connection must stay silent: whatever this is, it cannot be reused.
            self.abort()
            return
        try:
            events = self.parser.feed(data)
        except ResponseError as e:
            self._bad(str(e))
            return
        self._deliver(events)

    def _deliver(self, events: list[tuple[int, Any]]) -> None:
        user = self.user
        for kind, value in events:
            user = self.user
            if user is None or self.splice is not None:
                return
            if kind == DATA:
                user.upstream_data(value)
            elif kind == RESPONSE:
                user.upstream_response(value)
            elif kind == END:
                user.upstream_end()
            elif kind == INFO:
                user.upstream_informational(value)
        if user is not None and self.user is user:
            user.upstream_flush()

    def _bad(self, why: str) -> None:
        user, self.user = self.user, None
        self.abort()
        if user is not None:
            user.upstream_error(502, f"bad response: {why}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self._watch = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.splice is not None:
            self.splice.lost(1, reason)
            return
        self.pool.forget(self)
        if self.user is not None:
            try:
                self._deliver(self.parser.eof())  # a close-delimited body ends here
            except ResponseError:
                pass
        user, self.user = self.user, None
        if user is not None:
            user.upstream_lost(reason)

    # -- closing ---------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abortConnection()


class UpstreamPool:
    """Idle keep-alive connections per key (member address + TLS settings)."""

    def __init__(self, reactor: Any, max_idle: int = MAX_IDLE, idle_timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[Hashable, list[UpstreamConnection]] = {}
        self._sweep: Any = None
        self._closed = False
        self.opened = 0
        self.reused = 0

    def acquire(self, key: Hashable) -> Optional[UpstreamConnection]:
        """An idle connection for ``key``, or None."""
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.reusable and conn.transport is not None:
                self.reused += 1
                return conn
        return None

    def connect(self, key: Hashable, host: str, port: int, timeout: float,
                tls: Any = None) -> "Deferred[UpstreamConnection]":
        """Open a new connection; errbacks with :class:`~wmproxy_tw.connect.UpstreamError`."""
        conn = UpstreamConnection(self, key)
        factory: Any = quiet_factory(lambda: conn)
        if tls is not None:
            factory = TLSMemoryBIOFactory(tls, True, factory)
            factory.noisy = False
        d = connect(self.reactor, host, port, factory, timeout=timeout)
        self.opened += 1
        return d.addCallback(lambda _proto: conn)

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back after an exchange (closed unless cleanly reusable)."""
        conn.user = None
        conn._watch = None
        if not self._closed and conn.reusable:
            # The last client may have paused it (back-pressure) right before the
            # response ended: an idle connection always reads, to see it close.
            if conn.paused:
                conn.resume_reading()
            conns = self.idle.setdefault(conn.key, [])
            if len(conns) < self.max_idle:
                conn.idle_since = self.reactor.seconds()
                conn.served += 1
                conns.append(conn)
                if self._sweep is None:
                    self._sweep = self.reactor.callLater(self.idle_timeout, self._sweep_idle)
                return
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        oldest = None
        for key, conns in list(self.idle.items()):
            keep = []
            for c in conns:
                if now - c.idle_since >= self.idle_timeout:
                    c.close()
                else:
                    keep.append(c)
                    oldest = c.idle_since if oldest is None else min(oldest, c.idle_since)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        if oldest is not None and not self._closed:
            self._sweep = self.reactor.callLater(max(0.5, oldest + self.idle_timeout - now), self._sweep_idle)

    def close(self) -> None:
        """Close every idle connection; later releases close theirs."""
        self._closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
