"""The request object of the reverse proxy: a twisted.web ``Request`` plus
what the pipeline needs (route info, variables, the body seam, access-log
fields).

Handlers use the ordinary twisted.web API to answer (``setResponseCode``,
``setHeader``, ``write``, ``finish``, ``registerProducer``) and these
additions:

* ``stream_body(reader)`` / ``pause_body()`` / ``resume_body()`` — receive
  the request body as it arrives, with back-pressure (see
  :class:`~wmproxy_tw.reverse.handlers.IBodyReader`);
* ``discard_body(then)`` — drain the body, then call ``then``;
* ``vars`` — the request variables (:class:`wmproxy_tw.headers.RequestVars`);
* ``norm_path``, ``query``, ``host_name``, ``scheme``, ``client_ip``,
  ``websocket``, ``head`` (the parsed request head).

It also works under twisted.web's own channels (HTTP/2): there the body has
been buffered in ``content`` by the time it is processed, and
``stream_body`` replays it with the same back-pressure.  Buffering stops at the
server's largest ``client_max_body_size``: a body over it (declared or counted)
is answered at once through the pipeline (413), and once that answer is sent
the stream is reset with NO_ERROR so the client stops sending
(``reverse.http2``'s guarded connection).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.web import server
from twisted.web.http import NO_BODY_CODES, datetimeToString
from twisted.web.http_headers import Headers

from ..forward.httphead import RequestHead
from ..headers import RequestVars, apply_header_rules
from .h1 import normalize_path
from .route import RouteInfo

__all__ = ["ReverseRequest", "end_incomplete"]

REPLAY_CHUNK = 64 * 1024


def end_incomplete(request: Any) -> None:
    """End a response whose body cannot be completed: what was written is sent, then the
    connection closes without the body's end (no last chunk; fewer bytes than Content-Length),
    so it is never passed off as whole.  An HTTP/2 stream is reset."""
    channel = request.channel
    if channel is None or request._disconnected:
        return
    close = getattr(channel, "close_incomplete", None)
    if close is not None:
        close(request)
        return
    abort = getattr(channel, "abortConnection", None)  # an HTTP/2 stream: reset it
    if abort is None:
        abort = channel.transport.abortConnection
    abort()



class ReverseRequest(server.Request):
    """One request through the reverse proxy's pipeline."""

    defaultContentType = None  # never invent a Content-Type for a proxied response
    # Per-request state, defaults at class level (set per instance only when it changes).
    end: Optional[float] = None
    head: Optional[RequestHead] = None
    #: The head's field names in lower case (same order), when the channel made them.
    lower_names: Optional[list[str]] = None
    norm_path = "/"
    query = ""
    host_value = ""
    host_name = ""
    scheme = "http"
    has_body = False
    body_length: Optional[int] = None  # None: chunked (or no body)
    websocket = False
    ctx: Any = None  # the matched location (LocationCtx)
    response_rules: tuple[Any, ...] = ()
    up_status: Optional[int] = None
    up_addr: Optional[str] = None
    body_refused = False  # HTTP/2: over the largest client_max_body_size, answered before its end
    _h2_received = 0
    _h2_over = 0  # the (declared or counted) size that went over the limit
    _h2_processed = False
    up_time: Optional[float] = None
    #: Called (no arguments) if the client goes away before the response ends.
    on_gone: Optional[Callable[[], None]] = None
    _vars: Optional[RequestVars] = None
    _logged = False
    #: False when the connection ended before the response did ({request_completion}).
    completed = False
    _replay: Optional["_ContentReplay"] = None
    _raw_headers: Optional[list[tuple[bytes, bytes]]] = None
    _raw_flags: Optional[tuple[bool, bool]] = None  # (has Content-Length, has Date) of _raw_headers
    _request_headers: Optional[Headers] = None

    def __init__(self, channel: Any, queued: Any = None) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.site = channel.site
        self.clock = channel.site.clock
        self.start = self.clock.seconds()
        peer = self.client
        self.client_ip: str = getattr(peer, "host", "") or ""
        self.client_port: int = getattr(peer, "port", 0) or 0

    # twisted.web's requestHeaders, built from the parsed head only if someone asks.
    @property
    def requestHeaders(self) -> Headers:  # type: ignore[override]
        h = self._request_headers
        if h is None:
            h = Headers()
            for k, v in self.head.headers if self.head is not None else ():
                h.addRawHeader(k.encode("latin-1"), v.encode("latin-1"))
            self._request_headers = h
        return h

    @requestHeaders.setter
    def requestHeaders(self, value: Headers) -> None:
        self._request_headers = value

    # -- filled by the channel (or from twisted's attributes in process()) ------
    def prepare(self, head: Optional[RequestHead], norm_path: str, query: str, host_value: str, host_name: str,
                scheme: str, has_body: bool, websocket: bool, body_length: Optional[int] = None,
                lower_names: Optional[list[str]] = None) -> None:
        if head is not None and self.head is None:
            self._request_headers = None  # built lazily from the head
        self.head = head
        self.lower_names = lower_names
        self.norm_path = norm_path
        self.query = query
        self.host_value = host_value
        self.host_name = host_name
        self.scheme = scheme
        self.has_body = has_body
        self.body_length = body_length
        self.websocket = websocket

    # -- HTTP/2: twisted.web's H2Stream buffers the body here before process() -----
    def gotLength(self, length: Optional[int]) -> None:
        super().gotLength(length)
        if length is not None:
            self._h2_check(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._h2_received += len(data)
        if not self.body_refused and not self._h2_check(self._h2_received):
            super().handleContentChunk(data)

    def _h2_check(self, size: int) -> bool:
        """True (and the answer scheduled) once ``size`` is over what any location accepts."""
        limits = getattr(self.site, "limits", None)  # the ReverseSite's (the largest body any location takes)
        limit = limits.max_body_size if limits is not None else None
        if not limit or size <= limit:
            return False
        if not self.body_refused:
            self.body_refused = True
            self._h2_over = size
            self.clock.callLater(0, self._h2_answer_early)  # not from inside the H2Connection's events
        return True

    def _h2_answer_early(self) -> None:
        stream: Any = self.channel  # an H2Stream
        if self._h2_processed or stream is None:  # the body ended meanwhile, or the stream is gone
            return
        self.requestReceived(stream.command, stream.path, b"HTTP/2")

    def process(self) -> None:
        """Entry point under twisted.web's own channels (HTTP/2): the body is in ``content``."""
        self._h2_processed = True
        path = (self.path or b"/").decode("latin-1")
        try:
            norm = normalize_path(path)
        except ValueError:
            self.setResponseCode(400)
            self.finish()
            return
        host = (self.getHeader(b"host") or self.getHeader(b":authority") or b"").decode("latin-1")
        headers = tuple((k.decode("latin-1"), v.decode("latin-1"))
                        for k, vs in self.requestHeaders.getAllRawHeaders() for v in vs)
        head = RequestHead(self.method.decode("latin-1"), self.uri.decode("latin-1"),
                           self.clientproto.decode("latin-1"), headers)
        query = self.uri.decode("latin-1").partition("?")[2]
        content = self.content
        size = 0
        if content is not None:
            content.seek(0, 2)
            size = content.tell()
            content.seek(0, 0)
        if self.body_refused:  # what was not kept still counts (the pipeline answers 413)
            size = max(size, self._h2_received, self._h2_over)
        self.prepare(head, norm, query, host, host.rsplit(":", 1)[0].strip("[]").lower() if host else "",
                     "https" if self.isSecure() else "http", size > 0, False, size)
        site: Any = self.site
        site.dispatch(self)

    # -- the body seam -------------------------------------------------------------
    def stream_body(self, reader: Any) -> None:
        """Deliver the body to ``reader`` (``body_data``/``body_end``/``body_failed``)."""
        channel = self.channel
        if hasattr(channel, "start_body"):
            channel.start_body(self, reader)
            return
        self._replay = _ContentReplay(self.content, reader)
        self._replay.run()

    def discard_body(self, then: Callable[[], None]) -> None:
        """Read the body (if any) to its end without keeping it, then call ``then``."""
        channel = self.channel
        if self.has_body and hasattr(channel, "start_body"):
            channel.start_body(self, None, then)
        else:
            then()

    def limit_body(self, max_size: Optional[int]) -> bool:
        """Apply a location's ``client_max_body_size``: False (after answering
        413) when the declared length is already over it."""
        if not max_size or not self.has_body:
            return True
        if self.body_length is not None and self.body_length > max_size:
            from .handlers import respond_error

            respond_error(self, 413)
            return False
        channel = self.channel
        if hasattr(channel, "limit_body"):
            channel.limit_body(self, max_size)
        return True

    def pause_body(self) -> None:
        if self._replay is not None:
            self._replay.paused = True
        elif self.channel is not None and hasattr(self.channel, "pause_body"):
            self.channel.pause_body(self)

    def resume_body(self) -> None:
        if self._replay is not None:
            self._replay.paused = False
            self._replay.run()
        elif self.channel is not None and hasattr(self.channel, "resume_body"):
            self.channel.resume_body(self)

    @property
    def body_complete(self) -> bool:
        channel = self.channel
        if channel is not None and hasattr(channel, "body_complete"):
            return bool(channel.body_complete(self))
        return self._replay is None or self._replay.done

    def close_after_response(self) -> None:
        """Close the client connection once this response ends."""
        channel = self.channel
        if channel is not None and hasattr(channel, "close_after_response"):
            channel.close_after_response(self)

    # -- variables -----------------------------------------------------------------
    @property
    def vars(self) -> RequestVars:
        v = self._vars
        if v is None:
            head = self.head
            v = self._vars = RequestVars(
                client_ip=self.client_ip, client_port=self.client_port, host=self.host_value,
                url=self.uri.decode("latin-1"), path=self.norm_path, query=self.query, scheme=self.scheme,
                method=self.method.decode("latin-1"), header=head.get if head is not None else None)
        return v

    def route_info(self) -> RouteInfo:
        return RouteInfo(self.norm_path, self.host_name, self.method.decode("latin-1"), self.client_ip,
                         self.scheme, self.websocket)

    # -- response ------------------------------------------------------------------
    def set_raw_response(self, status: int, reason_: bytes, headers: list[tuple[bytes, bytes]],
                         has_length: Optional[bool] = None, has_date: Optional[bool] = None) -> None:
        """The response head as a list of raw fields (a proxied response): written
        as given, plus Date if absent, response rules, and our framing.
        ``has_length``/``has_date``: whether Content-Length/Date are among them,
        when the caller knows (saves a pass over the fields)."""
        self.code = status
        self.code_message = reason_
        self._raw_headers = headers
        self._raw_flags = None if has_length is None or has_date is None else (has_length, has_date)

    def write_whole(self, status: int, reason_: bytes, block: bytes, body: bytes) -> bool:
        """Write a complete response in one write: ``block`` holds its fields,
        formatted and final (Content-Length included; Date and our connection
        fields are added).  False, having done nothing, where the general path
        is needed: response header rules, a response already started, a
        channel without :meth:`~HTTP11Channel.head_bytes` (HTTP/2), HEAD."""
        channel = self.channel
        if (self.response_rules or self.startedWriting or self.finished or self._disconnected
                or self.method == b"HEAD" or not hasattr(channel, "head_bytes")):
            return False
        self.code = status
        self.code_message = reason_
        self.startedWriting = 1
        head = channel.head_bytes(self.clientproto, status, reason_, [(b"Date", _date(self.clock.seconds()))],
                                  False, block)
        self.sentLength += len(body)
        channel.write(head + body)
        return True

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            if self.finished:
                raise RuntimeError("Request.write called on a request after Request.finish was called.")
            if self._disconnected:
                return
            head = self._write_head()
            if self.method == b"HEAD" or self.code in NO_BODY_CODES:
                self.write = _discard  # type: ignore[method-assign]
                data = b""
            if head is not None:  # our channel: head and first bytes in one write
                if self._encoder and data:
                    data = self._encoder.encode(data)
                self.sentLength += len(data)
                if data and self.chunked:
                    head += b"%x\r\n" % len(data) + data + b"\r\n"
                elif data:
                    head += data
                self.channel.write(head)
                return
            if self.method == b"HEAD" or self.code in NO_BODY_CODES:
                return
        elif self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self._disconnected:
            return
        if self._encoder:
            data = self._encoder.encode(data)
        if data:
            self.sentLength += len(data)
            if self.chunked:
                self.channel.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                self.channel.write(data)

    def _write_head(self) -> Optional[bytes]:
        """What twisted.web's Request.write does on its first call, from raw fields.
        Returns the head to write (our channel), or None once written (other channels)."""
        self.startedWriting = 1
        raw = self._raw_headers
        if raw is None:
            raw = [(k, v) for k, vs in self.responseHeaders.getAllRawHeaders() for v in vs]
            names = {k.lower() for k, _ in raw}
            if (self.defaultContentType is not None and self.code not in NO_BODY_CODES
                    and b"content-type" not in names
                    and self.responseHeaders.getRawHeaders(b"content-length") != [b"0"]):
                raw.append((b"Content-Type", self.defaultContentType))
            if self.lastModified is not None and b"last-modified" not in names:
                raw.append((b"Last-Modified", datetimeToString(self.lastModified)))
            if self.etag is not None:
                raw = [(k, v) for k, v in raw if k.lower() != b"etag"] + [(b"ETag", self.etag)]
            if self.cookies:
                raw = [(k, v) for k, v in raw if k.lower() != b"set-cookie"]
                raw += [(b"Set-Cookie", c) for c in self.cookies]
        flags = self._raw_flags if raw is self._raw_headers else None
        if self.response_rules:
            pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
            apply_header_rules(pairs, self.response_rules, self.vars)
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
            flags = None
        if flags is not None:
            has_length, has_date = flags
        else:
            has_length = has_date = False
            for k, _v in raw:
                lk = k.lower()
                if lk == b"content-length":
                    has_length = True
                elif lk == b"date":
                    has_date = True
        if not has_date:
            raw.append((b"Date", _date(self.clock.seconds())))
        version = self.clientproto
        self.chunked = int(version == b"HTTP/1.1" and not has_length and self.method != b"HEAD"
                           and self.code not in NO_BODY_CODES)
        channel = self.channel
        head_bytes = getattr(channel, "head_bytes", None)
        if head_bytes is not None:
            return bytes(head_bytes(version, self.code, self.code_message, raw, bool(self.chunked)))
        headers = Headers()  # another channel (HTTP/2): its own framing
        for k, v in raw:
            headers.addRawHeader(k, v)
        channel.writeHeaders(version, b"%d" % self.code, self.code_message, headers)
        return None

    def finish(self) -> None:
        self.end = self.clock.seconds()
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        if self.end is None:
            self.end = self.clock.seconds()
        self.log_once(aborted=True)
        gone, self.on_gone = self.on_gone, None
        if gone is not None:
            gone()
        super().connectionLost(reason)

    # -- access log ------------------------------------------------------------------
    def log_once(self, aborted: bool = False) -> None:
        """Write this request's access-log line (once)."""
        if self._logged:
            return
        self._logged = True
        self.completed = not aborted
        ctx = self.ctx
        logger = getattr(ctx, "access_log", None)
        if logger is not None:
            logger.log(self.log_lookup, self.start)

    def log_lookup(self, name: str, arg: Optional[str] = None) -> Optional[str]:
        getter = _LOG_VARS.get(name)
        if getter is not None:
            return getter(self)
        return self.vars(name, arg)


_last_date: tuple[int, bytes] = (-1, b"")


def _date(now: float) -> bytes:
    """The Date field value for ``now``, formatted once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, datetimeToString(second))
    return _last_date[1]


def _header(name: str) -> Callable[[ReverseRequest], str]:
    def get(r: ReverseRequest) -> str:
        v = r.head.get(name) if r.head is not None else None
        return "-" if v is None else v
    return get


def _ssl_protocol(r: ReverseRequest) -> str:
    channel = r.channel
    transport = getattr(channel, "transport", None)
    handle = getattr(transport, "getHandle", None)
    if r.scheme != "https" or handle is None:
        return "-"
    try:
        name = handle().get_protocol_version_name()
    except AttributeError:
        return "-"
    return str(name)


def _seconds(t: Optional[float]) -> str:
    return "-" if t is None else f"{t:.3f}"


_LOG_VARS: dict[str, Callable[[ReverseRequest], str]] = {
    "status": lambda r: str(r.code),
    "up_status": lambda r: "-" if r.up_status is None else str(r.up_status),
    "up_addr": lambda r: r.up_addr or "-",
    "body_bytes_sent": lambda r: str(r.sentLength),
    "request_time": lambda r: _seconds((r.end if r.end is not None else r.clock.seconds()) - r.start),
    "up_response_time": lambda r: _seconds(r.up_time),
    "referer": _header("referer"),
    "user_agent": _header("user-agent"),
    "cookie": _header("cookie"),
    "ssl_protocol": _ssl_protocol,
    "protocol": lambda r: r.clientproto.decode("latin-1"),
    "request_completion": lambda r: "OK" if r.completed else "",  # as nginx's $request_completion
}

def _discard(data: bytes) -> None:
    """The body of a HEAD, 204 or 304 response goes nowhere."""


class _ContentReplay:
    """Feeds an already-buffered body (twisted.web ``content``) to a reader,
    stopping while the reader is paused."""

    def __init__(self, content: Any, reader: Any) -> None:
        self.content = content
        self.reader = reader
        self.paused = False
        self.done = False
        self._running = False
        if content is not None:
            content.seek(0, 0)

    def run(self) -> None:
        if self._running or self.done:
            return
        self._running = True
        try:
            while not self.paused and not self.done:
                chunk = self.content.read(REPLAY_CHUNK) if self.content is not None else b""
                if not chunk:
                    self.done = True
                    self.reader.body_end()
                    return
                self.reader.body_data(chunk)
        finally:
            self._running = False
