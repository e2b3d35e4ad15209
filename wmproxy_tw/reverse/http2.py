"""HTTP/2 on TLS listeners (``http2 = true``): ALPN and Twisted's H2 support.

Twisted serves HTTP/2 itself: a ``twisted.web.server.Site`` (any factory
whose protocol is ``twisted.web.http._GenericHTTPChannelProtocol``) behind TLS
switches a connection to ``H2Connection`` when ALPN chose ``h2``.  So the
listener only has to offer ``h2`` in ALPN — :func:`alpn_for` gives the list
for :func:`wmproxy_tw.tls.server_creator` — and h2 + priority must be
installed (``twisted[http2]``, checked by :func:`check_http2`).

The limits Twisted and hyper-h2 already enforce, per connection (see
docs/http2.md for the measurements and what is left):

* at most 100 concurrent streams (h2's ``MAX_CONCURRENT_STREAMS`` setting;
  more is a protocol error that closes the connection);
* Rapid Reset (CVE-2023-44487): stream resets are counted by a token bucket
  (burst 1000, 33 per second); an empty bucket sends GOAWAY
  ENHANCE_YOUR_CALM and closes;
* control-frame floods (PING/SETTINGS answered while the client does not
  read): at most 17 KiB of such replies are buffered, then the connection is
  aborted;
* CONTINUATION floods: h2 refuses a header block of more than 64 frames and
  header lists above 64 KiB;
* request bodies are flow controlled: the window is only reopened as the
  request consumes data;
* the Site's idle ``timeout`` applies to the H2 connection as a whole.

One gap is closed here: Twisted handles the frames of one read in a batch,
so a request whose stream the client reset *in the same batch* (exactly what
a Rapid Reset attack sends) was still processed, and a handler answering at
once wrote headers on a stream hyper-h2 had already closed — an unhandled
``StreamIDTooLowError``, then a ``KeyError`` that dropped the connection
without the GOAWAY.  ``GuardedH2Connection`` (:func:`guarded_h2_class`)
skips such requests and the rest of a batch after GOAWAY; :class:`ALPNSwitch`
is the per-connection protocol that becomes it (``h2``) or any HTTP/1.1
channel; :func:`serve_h2` makes a twisted.web Site use the switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ..listen import StartupError

__all__ = ["ALPN_H1", "ALPN_H2", "ALPNSwitch", "alpn_for", "check_http2", "guarded_h2_class", "h2_available",
           "h2_connection", "serve_h2"]

ALPN_H1: tuple[bytes, ...] = (b"http/1.1",)
ALPN_H2: tuple[bytes, ...] = (b"h2", b"http/1.1")


def alpn_for(http2: bool) -> tuple[bytes, ...]:
    """The ALPN protocols a TLS listener offers (``h2`` first when enabled)."""
    return ALPN_H2 if http2 else ALPN_H1


def h2_available() -> bool:
    """True when Twisted can speak HTTP/2 here (h2 and priority importable)."""
    from twisted.web import http

    return bool(getattr(http, "H2_ENABLED", False))


def check_http2(where: str, http2: bool, tls: bool) -> list[str]:
    """Start-up check of ``http2 = true``: StartupError when it can't work,
    warnings (one line each) when it has no effect."""
    if not http2:
        return []
    if not h2_available():
        raise StartupError(f"{where}.http2: HTTP/2 needs the h2 and priority packages "
                           "(pip install 'twisted[http2]')")
    if not tls:
        warning = f"{where}.http2: HTTP/2 is offered on TLS listeners (bind_ssl) only; bind_addr listeners stay HTTP/1.1"
        return [warning]
    return []


_GUARDED: list[Any] = []


def guarded_h2_class() -> Any:
    """:class:`GuardedH2Connection` (built on first use: importing
    twisted.web._http2 needs h2 installed)."""
    if _GUARDED:
        return _GUARDED[0]
    from h2.connection import ConnectionState
    from twisted.web._http2 import H2Connection

    class GuardedH2Connection(H2Connection):  # type: ignore[misc]
        """Twisted's H2Connection, except that the rest of a batch of frames is
        ignored once the connection is closed (GOAWAY sent: Twisted went on
        processing requests and resets of the batch, writing on a closed
        connection and looking up streams it had already dropped), and a request
        whose stream was reset in the same batch is never processed (its
        StreamReset event, which follows, tears the stream down and counts
        toward the reset limit).  A stream whose request was answered before
        its body ended (over client_max_body_size) is reset with NO_ERROR
        once the answer is sent."""

        def _closed(self) -> bool:
            return bool(self.conn.state_machine.state == ConnectionState.CLOSED)

        def _requestReceived(self, event: Any) -> None:
            if not self._closed():
                super()._requestReceived(event)

        def _requestDataReceived(self, event: Any) -> None:
            if not self._closed() and event.stream_id in self.streams:
                super()._requestDataReceived(event)

        def _requestEnded(self, event: Any) -> None:
            stream = self.conn.streams.get(event.stream_id)
            if self._closed() or stream is None or stream.closed or event.stream_id not in self.streams:
                return
            super()._requestEnded(event)

        def _requestAborted(self, event: Any) -> None:
            if not self._closed() and event.stream_id in self.streams:
                super()._requestAborted(event)

        def _requestDone(self, streamID: int) -> None:
            stream = self.streams.get(streamID)
            refused = getattr(getattr(stream, "_request", None), "body_refused", False)
            super()._requestDone(streamID)
            state = self.conn.streams.get(streamID)
            if refused and state is not None and not state.closed and not self._closed():
                # answered (413) before the client's body ended: ask it to stop sending (RFC 9113 §8.1)
                self.conn.reset_stream(streamID, error_code=0)
                self._tryToWriteControlData()

    _GUARDED.append(GuardedH2Connection)
    return GuardedH2Connection


def h2_connection(site: Any, clock: IReactorTime) -> Any:
    """A guarded H2Connection serving ``site`` (its ``requestFactory``, ``timeOut``)."""
    conn = guarded_h2_class()(clock)
    conn.requestFactory = site.requestFactory
    conn.site = site
    conn.factory = site
    conn.timeOut = site.timeOut
    conn.callLater = clock.callLater
    return conn


@implementer(IProtocol, IHandshakeListener)
class ALPNSwitch(Protocol):
    """The protocol of one TLS connection that may speak HTTP/2.

    It waits for the TLS handshake (bounded by ``handshake_timeout``), then
    becomes the guarded H2 connection if ALPN chose ``h2``, else the HTTP/1.1
    protocol ``h1()`` builds, and passes everything on to it.  Use it as a
    Site's ``buildProtocol`` result (see :func:`serve_h2`), or in any factory:
    ``ALPNSwitch(site, lambda: MyHTTP11Channel(...), clock)``.
    """

    transport: Any  # TLS (ISSLTransport and a consumer) or cleartext TCP

    def __init__(self, site: Any, h1: Callable[[], Any], clock: IReactorTime,
                 handshake_timeout: float | None = 10.0) -> None:
        self.site = site
        self.h1 = h1
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.chosen: Any = None
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = 1
        if not ISSLTransport.providedBy(transport):
            self._choose()  # cleartext: HTTP/1.1 only
        elif self.handshake_timeout:
            self._timer = self.clock.callLater(self.handshake_timeout, self._too_slow)

    def handshakeCompleted(self) -> None:
        self._choose()

    def _too_slow(self) -> None:
        self._timer = None
        if self.chosen is None:
            self.transport.abortConnection()

    def _choose(self) -> None:
        if self.chosen is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            self.chosen = h2_connection(self.site, self.clock)
            self.chosen.makeConnection(self.transport)
            self.transport.registerProducer(self.chosen, True)
        else:
            self.chosen = self.h1()
            self.chosen.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._choose()
        self.chosen.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.chosen is not None:
            self.chosen.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:
        # IHalfCloseableProtocol and friends of the chosen protocol
        chosen = self.__dict__.get("chosen")
        if chosen is None:
            raise AttributeError(name)
        return getattr(chosen, name)


def serve_h2(site: Any, clock: IReactorTime) -> Any:
    """Make a twisted.web Site (behind a TLS factory offering ``h2``) answer
    HTTP/2 with the guarded connection, HTTP/1.1 with its own channel."""
    if h2_available():
        h1 = site.buildProtocol
        site.buildProtocol = lambda addr: ALPNSwitch(site, lambda: h1(addr), clock)
    return site
