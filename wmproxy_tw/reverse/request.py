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
``stream_body`` replays it with the same back-pressure.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.web import server
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from ..forward.httphead import RequestHead
from ..headers import RequestVars, apply_header_rules
from .h1 import normalize_path
from .route import RouteInfo

__all__ = ["ReverseRequest"]

REPLAY_CHUNK = 64 * 1024


class ReverseRequest(server.Request):
    """One request through the reverse proxy's pipeline."""

    defaultContentType = None  # never invent a Content-Type for a proxied response

    def __init__(self, channel: Any, queued: Any = None) -> None:
        super().__init__(channel, parsePOSTFormSubmission=False)
        self.site = channel.site
        self.clock = channel.site.clock
        self.start = self.clock.seconds()
        self.end: Optional[float] = None
        self.head: Optional[RequestHead] = None
        self.norm_path = "/"
        self.query = ""
        self.host_value = ""
        self.host_name = ""
        self.scheme = "http"
        self.has_body = False
        self.body_length: Optional[int] = None  # None: chunked (or no body)
        self.websocket = False
        peer = self.client
        self.client_ip: str = getattr(peer, "host", "") or ""
        self.client_port: int = getattr(peer, "port", 0) or 0
        self.ctx: Any = None  # the matched location (LocationCtx)
        self.response_rules: tuple[Any, ...] = ()
        self.up_status: Optional[int] = None
        self.up_addr: Optional[str] = None
        self.up_time: Optional[float] = None
        self._vars: Optional[RequestVars] = None
        self._logged = False
        self._replay: Optional[_ContentReplay] = None

    # -- filled by the channel (or from twisted's attributes in process()) ------
    def prepare(self, head: Optional[RequestHead], norm_path: str, query: str, host_value: str, host_name: str,
                scheme: str, has_body: bool, websocket: bool, body_length: Optional[int] = None) -> None:
        self.head = head
        self.norm_path = norm_path
        self.query = query
        self.host_value = host_value
        self.host_name = host_name
        self.scheme = scheme
        self.has_body = has_body
        self.body_length = body_length
        self.websocket = websocket

    def process(self) -> None:
        """Entry point under twisted.web's own channels (HTTP/2): the body is in ``content``."""
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
        self.prepare(head, norm, query, host, host.rsplit(":", 1)[0].strip("[]").lower() if host else "",
                     "https" if self.isSecure() else "http", size > 0, False, size)
        self.site.dispatch(self)

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
    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            if self.response_rules:
                pairs = [(k.decode("latin-1"), v.decode("latin-1"))
                         for k, vs in self.responseHeaders.getAllRawHeaders() for v in vs]
                apply_header_rules(pairs, self.response_rules, self.vars)
                h = Headers()
                for k, val in pairs:
                    h.addRawHeader(k.encode("latin-1"), val.encode("latin-1"))
                self.responseHeaders = h
            if not self.responseHeaders.hasHeader(b"date"):
                self.responseHeaders.setRawHeaders(b"Date", [datetimeToString(self.clock.seconds())])
        super().write(data)

    def finish(self) -> None:
        self.end = self.clock.seconds()
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        if self.end is None:
            self.end = self.clock.seconds()
        self.log_once(aborted=True)
        super().connectionLost(reason)

    # -- access log ------------------------------------------------------------------
    def log_once(self, aborted: bool = False) -> None:
        """Write this request's access-log line (once)."""
        if self._logged:
            return
        self._logged = True
        ctx = self.ctx
        logger = getattr(ctx, "access_log", None)
        if logger is not None:
            logger.log(self.log_lookup, self.start)

    def log_lookup(self, name: str, arg: Optional[str] = None) -> Optional[str]:
        getter = _LOG_VARS.get(name)
        if getter is not None:
            return getter(self)
        return self.vars(name, arg)


def _header(name: bytes) -> Callable[[ReverseRequest], str]:
    def get(r: ReverseRequest) -> str:
        v = r.requestHeaders.getRawHeaders(name)
        return v[0].decode("latin-1") if v else "-"
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
    "referer": _header(b"referer"),
    "user_agent": _header(b"user-agent"),
    "cookie": _header(b"cookie"),
    "ssl_protocol": _ssl_protocol,
    "protocol": lambda r: r.clientproto.decode("latin-1"),
}

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
