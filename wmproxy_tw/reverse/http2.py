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
without the GOAWAY.  :class:`GuardedH2Connection` skips such requests;
:class:`ChannelProtocol` is the Site protocol that uses it (set
``site.protocol = ChannelProtocol.build``, as :func:`use_guarded_h2` does).
"""

from __future__ import annotations

from typing import Any

from ..listen import StartupError

__all__ = ["ALPN_H1", "ALPN_H2", "alpn_for", "check_http2", "h2_available", "use_guarded_h2"]

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


def _guarded_classes() -> tuple[Any, Any]:
    """Built on first use: importing twisted.web._http2 needs h2 installed."""
    from h2.connection import ConnectionState
    from twisted.web import http
    from twisted.web._http2 import H2Connection

    class GuardedH2Connection(H2Connection):  # type: ignore[misc]
        """Twisted's H2Connection, except that the rest of a batch of frames is
        ignored once the connection is closed (GOAWAY sent: Twisted went on
        processing requests and resets of the batch, writing on a closed
        connection and looking up streams it had already dropped), and a request
        whose stream was reset in the same batch is never processed (its
        StreamReset event, which follows, tears the stream down and counts
        toward the reset limit)."""

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

    class ChannelProtocol(http._GenericHTTPChannelProtocol):  # type: ignore[misc]
        """twisted.web's HTTP/1.1-or-HTTP/2 channel, with :class:`GuardedH2Connection`."""

        @classmethod
        def build(cls) -> Any:
            """What ``Site.protocol`` must be: called with no argument per connection."""
            return cls(http.HTTPChannel())

        def dataReceived(self, data: bytes) -> Any:
            if self._negotiatedProtocol is None and \
                    getattr(self._channel.transport, "negotiatedProtocol", None) == b"h2":
                # Twisted's own switch (http._GenericHTTPChannelProtocol.dataReceived),
                # with the guarded connection class.
                producer = self._channel._networkProducer
                producer.unregisterProducer()
                self._channel.setTimeout(None)
                transport = self._channel.transport
                self._channel = GuardedH2Connection()
                self._channel.requestFactory = self._requestFactory
                self._channel.site = self._site
                self._channel.factory = self._factory
                self._channel.timeOut = self._timeOut
                self._channel.callLater = self._callLater
                self._channel.makeConnection(transport)
                producer.registerProducer(self._channel, True)
                self._negotiatedProtocol = b"h2"
            return super().dataReceived(data)

    return GuardedH2Connection, ChannelProtocol


def use_guarded_h2(site: Any) -> Any:
    """Make a twisted.web Site build :class:`ChannelProtocol` (when h2 is
    available; plain Twisted otherwise, which then never negotiates h2)."""
    if h2_available():
        site.protocol = _guarded_classes()[1].build
    return site
