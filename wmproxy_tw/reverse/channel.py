"""The HTTP/1.1 server connection of the reverse proxy.

It plays the part of twisted.web's ``HTTPChannel`` for our
:class:`~wmproxy_tw.reverse.request.ReverseRequest` objects (the ``Request``
API — ``setResponseCode``, ``write``, ``finish``, ``registerProducer`` —
works unchanged), but it owns the parts a proxy must control:

* the head is parsed by the sans-IO
  :class:`~wmproxy_tw.forward.httphead.RequestHeadParser` in strict mode
  (no bare LF), with the header size and count limits (431, 414) and a
  header read *deadline* from the first byte to the end of the head (408;
  Twisted's own timeout restarts on every byte, which a slow-loris exploits);
* framing is checked by :func:`~wmproxy_tw.forward.httphead.body_framing`
  (CL+TE, differing CL, obfuscated TE → 400) plus Host rules (missing on
  HTTP/1.1 or repeated → 400), before anything is routed;
* a request is dispatched when its head is complete; the body is then
  *streamed* to whoever asks for it (``request.stream_body(reader)``) with
  back-pressure (``pause_body``/``resume_body``), or drained
  (``discard_body``), never buffered whole; ``client_max_body_size`` → 413;
  ``Expect: 100-continue`` is answered when the body is first wanted;
* pipelined requests wait (bounded) until the response before them ends;
* idle keep-alive, body read and send-stall timeouts;
* :meth:`HTTP11Channel.take_over` hands the raw connection to a
  :class:`~wmproxy_tw.relay.Splice` (WebSocket passthrough).

Errors found before a response started are answered with a short plain
response and the connection is closed; after, the connection is aborted.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..forward.httphead import HttpHeadError, RequestHead, RequestHeadParser, body_framing
from .h1 import BodyError, ChunkedDecoder, LengthDecoder, normalize_path, reason
from .wire import eager_write

__all__ = ["Limits", "HTTP11Channel"]

_log = Logger()

_HEAD, _BODY, _WAIT, _SPLICED, _CLOSED = "head", "body", "wait", "spliced", "closed"

#: Bytes of pipelined requests read ahead while a response is in progress.
PIPELINE_BUFFER = 64 * 1024
#: After a graceful close, abort the connection if it is still open then.
CLOSE_GRACE = 10.0


@dataclass(frozen=True)
class Limits:
    """Per-listener limits (SPEC §10), from the listener's default server."""

    max_header_size: int = 16 * 1024
    max_headers: int = 100
    max_body_size: Optional[int] = 1024**3
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTP11Channel(Protocol):
    """One client connection; builds a request object per request head."""

    # Slots: an idle keep-alive connection is this object; no per-instance dict (SPEC §11 memory).
    __slots__ = ("transport", "connected", "site", "factory", "requestFactory", "clock", "limits", "_state",
                 "_parser", "_pending", "_pending_len", "_driving", "_request", "_persistent", "_decoder",
                 "_reader", "_discard_done", "_body_wanted", "_expect_continue", "_read_pauses", "_producer",
                 "_producer_streaming", "_write_paused", "_timer", "_timer_kind", "_deadline", "_last_read",
                 "_stall", "_abort_call", "_head_started", "_last_host", "_closing", "_splice", "requests_served",
                 "_peer", "_host", "_secure")
    transport: Any
    _peer: Any
    _host: Any

    def __init__(self, site: Any, limits: Limits) -> None:
        self.transport = None
        self.connected = 0
        self.site = site
        self.factory = site  # Request.finish() logs through channel.factory.log
        self.requestFactory = site.requestFactory
        self.clock = site.clock
        self.limits = limits
        self._state = _HEAD
        self._parser = self._new_parser()
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._driving = False
        self._request: Any = None
        self._persistent = True
        self._decoder: Any = None
        self._reader: Any = None
        self._discard_done: Optional[Callable[[], None]] = None
        self._body_wanted = False
        self._expect_continue = False
        self._read_pauses: set[str] = set()
        self._producer: Any = None
        self._producer_streaming = True
        self._write_paused = False
        self._timer: Any = None
        self._timer_kind = ""
        self._deadline: Optional[float] = None
        self._last_read = 0.0
        self._stall: Any = None
        self._abort_call: Any = None
        self._head_started = False
        self._last_host: tuple[Optional[str], Optional[str]] = (None, None)
        self._closing = False
        self._splice: Any = None
        self.requests_served = 0

    def _new_parser(self) -> RequestHeadParser:
        lim = self.limits
        return RequestHeadParser(max_line=lim.max_header_size, max_header_bytes=lim.max_header_size,
                                 max_headers=lim.max_headers, allow_bare_lf=False)

    # -- connection --------------------------------------------------------------
    def connectionMade(self) -> None:
        t = self.transport
        self._peer = t.getPeer()
        self._host = t.getHost()
        self._secure = ISSLTransport.providedBy(t)
        if ITCPTransport.providedBy(t):
            t.setTcpNoDelay(True)
        t.registerProducer(self, True)
        self._set_timer(self.limits.header_timeout, "head")

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    def isSecure(self) -> bool:
        return self._secure

    # -- timers ------------------------------------------------------------------
    def _set_timer(self, seconds: Optional[float], kind: str) -> None:
        """One deadline at a time; the DelayedCall is kept and moved lazily
        (most deadlines are cleared long before they expire)."""
        self._timer_kind = kind
        if not seconds:
            self._deadline = None
            return
        self._deadline = deadline = self.clock.seconds() + seconds
        t = self._timer
        if t is None:
            self._timer = self.clock.callLater(seconds, self._timer_fired)
        elif t.getTime() > deadline:
            t.reset(seconds)

    def _timer_fired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self._closing or deadline is None:
            return
        kind = self._timer_kind
        if kind == "body":
            if not self._body_wanted or "body" in self._read_pauses:
                deadline = self._deadline = self.clock.seconds() + self.limits.read_timeout  # paused by us
            else:
                deadline = self._last_read + self.limits.read_timeout
        left = deadline - self.clock.seconds()
        if left > 0.001:
            self._timer = self.clock.callLater(left, self._timer_fired)
            return
        self._deadline = None
        if kind == "head":
            if self._head_started or self.requests_served == 0:
                self._fail(408, "request head not received in time")
            else:
                self._close()
        elif kind == "keepalive":
            self._close()
        elif kind == "body":
            _log.info("reverse proxy: {client}: request body stalled for {t}s", client=self._peer.host,
                      t=self.limits.read_timeout)
            self._fail(408, "request body not received in time")

    def _stop_timer(self) -> None:
        self._deadline = None
        t, self._timer = self._timer, None
        if t is not None and t.active():
            t.cancel()

    # -- reading -----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.received(0, data)
            return
        if self._closing:
            return
        self._pending.append(data)
        self._pending_len += len(data)
        self._drive()

    def _take_pending(self) -> bytes:
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pending_len = 0
        return data

    def _drive(self) -> None:
        if self._driving:
            return
        self._driving = True
        try:
            while self._pending and not self._closing:
                state = self._state
                if state is _HEAD:
                    self._read_head(self._take_pending())
                elif state is _BODY:
                    if not self._body_wanted:
                        self._pause_reading("body")
                        break
                    self._read_body(self._take_pending())
                elif state is _WAIT:
                    if self._pending_len > PIPELINE_BUFFER:
                        self._pause_reading("pipeline")
                    break
                else:
                    break
        finally:
            self._driving = False

    def _read_head(self, data: bytes) -> None:
        if not self._head_started:
            self._head_started = True
            if self._timer_kind != "head":
                self._set_timer(self.limits.header_timeout, "head")
        try:
            head = self._parser.feed(data)
        except HttpHeadError as e:
            self._fail(e.status, e.message)
            return
        if head is None:
            return
        leftover = self._parser.take_leftover()
        if leftover:
            self._pending.insert(0, leftover)
            self._pending_len += len(leftover)
        self._on_head(head)

    def _on_head(self, head: RequestHead) -> None:
        self._head_started = False
        self._set_timer(None, "")
        hosts: list[str] = []
        connection: list[str] = []
        upgrade: list[str] = []
        expect: Optional[str] = None
        framing = False
        names: list[str] = []  # lower-case names, kept for the handlers (one conversion per request)
        for name, value in head.headers:  # one pass for the fields that steer the channel
            n = name.lower()
            names.append(n)
            if n == "host":
                hosts.append(value)
            elif n == "connection":
                connection.append(value)
            elif n == "content-length" or n == "transfer-encoding":
                framing = True
            elif n == "upgrade":
                upgrade.append(value)
            elif n == "expect" and expect is None:
                expect = value
        kind: str = "none"
        length: Optional[int] = 0
        if framing:
            try:
                kind, length = body_framing(head)  # CL+TE, differing CL, obfuscated TE → 400
            except HttpHeadError as e:
                self._fail(e.status, e.message)
                return
        version = head.version
        if len(hosts) > 1:
            self._fail(400, "more than one Host field")
            return
        if not hosts and version == "HTTP/1.1":
            self._fail(400, "HTTP/1.1 request without Host")
            return
        host_value = hosts[0] if hosts else ""
        target = head.target
        if target.startswith("/"):
            path, _, query = target.partition("?")
        elif target == "*" and head.method == "OPTIONS":
            path, query = "*", ""
        elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
            rest = target.split("://", 1)[1]
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            host_value, tail = rest[:cut], rest[cut:]
            if not host_value or "@" in host_value:
                self._fail(400, "malformed absolute-form request-target")
                return
            path, _, query = ("/" + tail if not tail.startswith("/") else tail).partition("?")
        else:
            self._fail(400, "malformed request-target")
            return
        if "#" in target:
            self._fail(400, "fragment in request-target")
            return
        try:
            norm = normalize_path(path)
        except ValueError as e:
            self._fail(400, f"bad path: {e}")
            return
        if host_value == self._last_host[0]:
            host_name = self._last_host[1]
        else:
            host_name = _host_name(host_value)
            if host_name is None:
                self._fail(400, "malformed Host")
                return
            self._last_host = (host_value, host_name)
        tokens = _tokens(connection) if connection else set()
        if version == "HTTP/1.1":
            self._persistent = "close" not in tokens
        else:
            self._persistent = False
        has_body = (kind == "length" and bool(length)) or kind == "chunked"
        self._expect_continue = False
        if expect is not None:
            if expect.lower() != "100-continue":
                self._fail(417, "only 'Expect: 100-continue' is understood")
                return
            self._expect_continue = has_body and version == "HTTP/1.1"
        max_body = self.limits.max_body_size
        if kind == "length" and max_body is not None and length is not None and length > max_body:
            self._fail(413, "request body too large")
            return
        websocket = bool(upgrade) and head.method == "GET" and "upgrade" in tokens and "websocket" in _tokens(upgrade)

        req = self.requestFactory(self)
        req.method = head.method.encode("ascii")
        req.uri = target.encode("latin-1")
        req.path = path.encode("latin-1")
        req.clientproto = version.encode("ascii")
        req.args = parse_qs(query.encode("latin-1"), True) if query else {}
        req.content = BytesIO()
        req.prepare(head=head, norm_path=norm, query=query, host_value=host_value, host_name=host_name,
                    scheme="https" if self._secure else "http", has_body=has_body, websocket=websocket,
                    body_length=length if kind == "length" else None, lower_names=names)
        self._request = req
        self.requests_served += 1
        if has_body:
            self._state = _BODY
            self._decoder = (LengthDecoder(length or 0) if kind == "length"
                             else ChunkedDecoder(max_size=max_body))
            self._body_wanted = False
            self._pause_reading("body")
        else:
            self._state = _WAIT
        self.site.dispatch(req)

    def _read_body(self, data: bytes) -> None:
        self._last_read = self.clock.seconds()
        try:
            chunks, done, leftover = self._decoder.feed(data)
        except BodyError as e:
            self._body_error(e.status, e.message)
            return
        reader = self._reader
        if reader is not None:
            for c in chunks:
                reader.body_data(c)
        if done:
            if leftover:
                self._pending.insert(0, leftover)
                self._pending_len += len(leftover)
            self._body_complete()

    def _body_complete(self) -> None:
        self._state = _WAIT
        self._decoder = None
        self._body_wanted = False
        self._set_timer(None, "")
        self._resume_reading("body")
        reader, self._reader = self._reader, None
        then, self._discard_done = self._discard_done, None
        if reader is not None:
            reader.body_end()
        elif then is not None:
            then()

    def _body_error(self, status: int, message: str) -> None:
        reader, self._reader = self._reader, None
        self._discard_done = None
        if reader is not None:
            reader.body_failed(status, message)
        self._fail(status, message)

    # -- the body seam (called through the request) -----------------------------
    def start_body(self, request: Any, reader: Any = None, then: Optional[Callable[[], None]] = None) -> None:
        """Deliver the body of ``request`` to ``reader`` (an
        :class:`~wmproxy_tw.reverse.handlers.IBodyReader`), or drain it and then call ``then``."""
        if request is not self._request or self._state is not _BODY or self._body_wanted:
            if then is not None and request is self._request and self._state is _WAIT:
                then()
            return
        self._reader = reader
        self._discard_done = then
        self._body_wanted = True
        if self._expect_continue:
            self._expect_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._last_read = self.clock.seconds()
        self._set_timer(self.limits.read_timeout, "body")
        self._resume_reading("body")
        self._drive()

    def pause_body(self, request: Any) -> None:
        if request is self._request and self._state is _BODY:
            self._pause_reading("body")

    def resume_body(self, request: Any) -> None:
        if request is self._request and self._state is _BODY and self._body_wanted:
            self._resume_reading("body")
            self._drive()

    def limit_body(self, request: Any, max_size: Optional[int]) -> None:
        """Lower the body-size cap for this request (a location's client_max_body_size)."""
        dec = self._decoder
        if request is self._request and isinstance(dec, ChunkedDecoder) and max_size is not None:
            dec.max_size = max_size if dec.max_size is None else min(dec.max_size, max_size)

    def body_complete(self, request: Any) -> bool:
        """True when the request's body (if any) has been read entirely."""
        return request is not self._request or self._state is not _BODY

    def close_after_response(self, request: Any) -> None:
        """Do not reuse the connection once this response ends."""
        if request is self._request:
            self._persistent = False

    def close_incomplete(self, request: Any) -> None:
        """The response to ``request`` cannot be completed (its upstream or file failed): send
        what was written, then close without ending the body (no last chunk), so the client sees
        a short body and a close, never a complete-looking one.  Aborted after CLOSE_GRACE."""
        if request is self._request:
            self._persistent = False
            self._close()

    def _pause_reading(self, why: str) -> None:
        if not self._read_pauses and not self._closing:
            self.transport.pauseProducing()
        self._read_pauses.add(why)

    def _resume_reading(self, why: str) -> None:
        if why not in self._read_pauses:
            return
        self._read_pauses.discard(why)
        if not self._read_pauses and not self._closing:
            self.transport.resumeProducing()

    # -- end of a request ------------------------------------------------------------
    def requestDone(self, request: Any) -> None:
        """Called by the request once its response is complete."""
        if request is not self._request:
            return
        self._request = None
        if self._producer is not None:
            self.unregisterProducer()
        if self._state is _BODY or not self._persistent or self._closing:
            self._reader = None
            self._close()
            return
        self._state = _HEAD  # the head parser has reset itself (take_leftover)
        self._set_timer(self.limits.keepalive_timeout, "keepalive")
        self._resume_reading("pipeline")
        self._drive()

    # -- writing (the channel API of twisted.web requests) ---------------------------
    def head_bytes(self, version: bytes, code: int, reason_: bytes, headers: list[tuple[bytes, bytes]],
                   chunked: bool, block: bytes = b"") -> bytes:
        """A response head from raw fields (see ReverseRequest._write_head), with our
        framing and connection fields; the request writes it with its first body bytes.
        ``block``: fields already formatted (``Name: value\\r\\n`` lines, no Connection
        among them), written first."""
        parts = [version, b" %d " % code, reason_, b"\r\n", block]
        connection = False
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
            if not connection and len(name) == 10 and name.lower() == b"connection":
                connection = True
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not self._persistent and version == b"HTTP/1.1" and not connection:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def writeHeaders(self, version: bytes, code: bytes, reason_: bytes, headers: Headers) -> None:
        if self._closing:
            return
        parts = [version, b" ", code, b" ", reason_, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        if not self._persistent and version == b"HTTP/1.1" and not headers.hasHeader(b"connection"):
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def write(self, data: bytes) -> None:
        if not self._closing:
            eager_write(self.transport, data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        if not self._closing:
            eager_write(self.transport, b"".join(iovec))

    def loseConnection(self) -> None:
        self._close()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"cannot register {producer!r}: {self._producer!r} is still registered")
        if not streaming:
            producer = _PullToPush(producer, self)
        self._producer = producer
        self._producer_streaming = streaming
        if not streaming:
            producer.startStreaming()
        elif self._write_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None and not self._producer_streaming:
            producer.stopStreaming()

    # IPushProducer, towards the transport: its write buffer is full / drained.
    def pauseProducing(self) -> None:
        self._write_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if self._stall is None and self.limits.write_timeout:
            self._stall = self.clock.callLater(self.limits.write_timeout, self._write_stalled)

    def resumeProducing(self) -> None:
        self._write_paused = False
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    def _write_stalled(self) -> None:
        self._stall = None
        _log.info("reverse proxy: {client} read nothing for {t}s: closing", client=self._peer.host,
                  t=self.limits.write_timeout)
        self._abort()

    # -- WebSocket (or any upgrade): hand the raw connection over ----------------
    def take_over(self, splice: Any) -> bytes:
        """Stop HTTP processing; bytes read from now on go to ``splice`` leg A.

        Returns the bytes already read after the request head (they belong
        to the new protocol).
        """
        self._set_timer(None, "")
        self._request = None
        self._state = _SPLICED
        self._splice = splice
        if self._producer is not None:
            self.unregisterProducer()
        self.transport.unregisterProducer()
        pending = self._take_pending()
        if self._read_pauses:
            self._read_pauses.clear()
            self.transport.resumeProducing()
        return pending

    # -- closing ---------------------------------------------------------------
    def _fail(self, status: int, message: str) -> None:
        """Answer a protocol error (unless a response already started) and close."""
        req = self._request
        started = req is not None and getattr(req, "startedWriting", False)
        if self._closing:
            return
        if started:
            self._abort()
            return
        if req is not None:
            req.code = status  # what its access-log line will say
        _log.debug("reverse proxy: {client}: {status} {message}", client=self._peer.host,
                   status=status, message=message)
        body = f"{status} {reason(status)}: {message}\n".encode()
        head = (f"HTTP/1.1 {status} {reason(status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_timer()
        self._pending = []
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass
        self.transport.loseConnection()
        if getattr(self.transport, "connected", True):
            self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self._closing = True
        self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.read_closed(0)
            return
        if self._request is None:
            self._close()
        elif self._state is _BODY:
            self._body_error(400, "client closed the connection in the middle of the body")
        else:
            self._persistent = False

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason_: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        self._state = _CLOSED
        self._stop_timer()
        for call in (self._stall, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._stall = self._abort_call = None
        if self._splice is not None:
            self._splice.lost(0, reason_)
            return
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.body_failed(400, "client gone")
        req, self._request = self._request, None
        if req is not None:
            req.connectionLost(reason_)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.stopProducing()


def _tokens(values: list[str]) -> set[str]:
    return {t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")}


def _host_name(value: str) -> Optional[str]:
    """The host of a Host field value, lower case, without port; None if malformed."""
    v = value.strip().lower()
    if not v:
        return ""
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or (v[end + 1:] and not (v[end + 1] == ":" and v[end + 2:].isdigit())):
            return None
        return v[1:end]
    host, sep, port = v.rpartition(":")
    if sep:
        if not port.isdigit() or not host:
            return None
        v = host
    if any(c in v for c in " /\\@?#"):
        return None
    return v.rstrip(".")
