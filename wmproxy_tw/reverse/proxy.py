"""One proxied request: choose a member, connect (or reuse), stream both ways.

An :class:`Exchange` is created per request by
:class:`~wmproxy_tw.reverse.handlers.ProxyHandler`.  Its life:

1. select a member of the group (``ip_hash``/``hash`` keys from the request),
   take an idle pooled connection or open one (``proxy_connect_timeout``);
   a connect failure of an idempotent request is retried on the next member
   (``proxy_next_upstream``), and every failure is reported to the group
   (passive health); a pooled connection the upstream had closed meanwhile
   is replaced once, transparently;
2. send the head — hop-by-hop fields and ``Proxy-Authorization`` removed,
   ``Host`` kept, ``X-Forwarded-For/-Proto/-Host`` set (an incoming chain is
   extended only for ``trusted_proxies``), the location's ``proxy ...``
   header rules applied, the matched prefix replaced when ``proxy_url`` has
   a path — then stream the body as the client sends it (the upstream
   transport's back-pressure pauses the client; ``proxy_write_timeout``
   bounds a stall);
3. stream the response back (the client's back-pressure pauses the upstream;
   ``proxy_read_timeout`` bounds the wait between reads); 502 when the
   upstream cannot be reached or answers garbage, 504 on timeouts; once the
   response has started, a failure aborts the client connection so a
   truncated body never looks complete;
4. give the connection back to the pool when both messages ended cleanly.

A ``101`` answer to a WebSocket upgrade (``is_ws`` locations) is relayed as
the upstream sent it and both connections are spliced with
:class:`wmproxy_tw.relay.Splice` (with ``rate_limit``, the client's leg is a
:class:`wmproxy_tw.limits.PacedTransport` on the connection's bucket).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..connect import UpstreamError
from ..forward.httphead import HOP_BY_HOP as HOP_BY_HOP_FIELDS
from ..forward.httphead import HOP_BY_HOP_BYTES as _HOP_BY_HOP
from ..forward.httphead import IDEMPOTENT, hop_by_hop_clean
from ..headers import apply_header_rules
from ..limits import PacedTransport, Throttle, connection_bucket
from ..relay import A, B, Splice
from .h1 import reason, request_head
from .handlers import IBodyReader, respond_error
from .request import end_incomplete

__all__ = ["Exchange", "IDEMPOTENT", "forwarded_headers", "response_fields"]

_log = Logger()

_FRAMING = frozenset({"content-length", "transfer-encoding"})
#: Request fields the proxy decides itself (never copied from the client).
_CLIENT_ONLY = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                          "forwarded", "x-real-ip"})
#: What a request without a Connection field loses on the way up (hop_by_hop_clean's set, framing, ours).
_NOT_FORWARDED = HOP_BY_HOP_FIELDS | _FRAMING | _CLIENT_ONLY
_SAFE_PATH = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]")
#: Connection tokens that name no field to drop (keep-alive/close), or one we never drop.
_CONNECTION_HARMLESS = frozenset({b"", b"close", b"content-length"}) | _HOP_BY_HOP


def forwarded_headers(headers: list[tuple[str, str]], client_ip: str, scheme: str, host: str,
                      trusted: bool) -> list[tuple[str, str]]:
    """The ``X-Forwarded-*`` fields to send: an incoming chain is extended only
    for a trusted peer; from anyone else it is replaced."""
    if not trusted:
        out = [("X-Forwarded-For", client_ip), ("X-Forwarded-Proto", scheme)]
        return out + [("X-Forwarded-Host", host)] if host else out
    xff = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    proto = next((v for k, v in headers if k.lower() == "x-forwarded-proto"), None)
    fhost = next((v for k, v in headers if k.lower() == "x-forwarded-host"), None)
    out = [("X-Forwarded-For", ", ".join(xff + [client_ip])), ("X-Forwarded-Proto", proto or scheme)]
    if fhost or host:
        out.append(("X-Forwarded-Host", fhost or host))
    return out + [(k, v) for k, v in headers if k.lower() in ("forwarded", "x-real-ip")]


def response_fields(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response fields for the client: hop-by-hop ones (and
    those its Connection field names) removed; framing is ours to decide."""
    return client_fields(raw)[0]


def client_fields(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool, bool]:
    """:func:`response_fields` in one pass, and whether Content-Length and Date are among them."""
    out = []
    extra: Optional[set[bytes]] = None
    has_length = has_date = False
    for k, v in raw:
        lk = k.lower()
        if lk in _HOP_BY_HOP:
            if lk == b"connection":
                tokens = {t.strip(b" \t").lower() for t in v.split(b",")} - _CONNECTION_HARMLESS
                if tokens:
                    extra = tokens if extra is None else extra | tokens
            continue
        if lk == b"content-length":
            has_length = True
        elif lk == b"date":
            has_date = True
        out.append((k, v))
    if extra:  # Connection names more fields to drop (wherever they are)
        out = [(k, v) for k, v in out if k.lower() not in extra]
        names = {k.lower() for k, _ in out}
        has_length, has_date = b"content-length" in names, b"date" in names
    return out, has_length, has_date


@implementer(IPushProducer)
class _ResponsePump:
    """Registered on the client request: the client's back-pressure pauses the upstream."""

    def __init__(self, conn: Any, ex: "Exchange") -> None:
        self.conn = conn
        self.ex = ex

    def pauseProducing(self) -> None:
        self.conn.pause_reading()

    def resumeProducing(self) -> None:
        self.conn.resume_reading()

    def stopProducing(self) -> None:
        self.ex.client_gone()


@implementer(IPushProducer)
class _BodyPump:
    """Registered on the upstream transport: its back-pressure pauses the client's upload."""

    def __init__(self, ex: "Exchange") -> None:
        self.ex = ex

    def pauseProducing(self) -> None:
        self.ex.upstream_write_paused()

    def resumeProducing(self) -> None:
        self.ex.upstream_write_resumed()

    def stopProducing(self) -> None:
        pass


@implementer(IBodyReader)
class Exchange:
    """The proxying of one request (see the module docstring)."""

    # Per-exchange state: the defaults here, set on the instance when they change.
    member: Any = None
    conn: Any = None
    reused = False
    last_error: Optional[UpstreamError] = None
    done = False
    started_at = 0.0
    got_response = False
    body_started = False
    body_kind: Optional[str] = None
    _head_pending = False
    _counted = False
    _pump: Optional[_BodyPump] = None
    _reader: Optional[_ResponsePump] = None
    _write_timer: Any = None
    _connecting: Any = None

    def __init__(self, handler: Any, request: Any, ctx: Any) -> None:
        self.h = handler
        self.request = request
        self.ctx = ctx
        self.clock = handler.clock
        self.group = handler.group
        self.tried: set[Any] = set()
        self.body_sent = not request.has_body
        self.upgrade = bool(request.websocket and ctx.is_ws)
        self._out: Any = request  # the request, or a Throttle over it (rate_limit)

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        req = self.request
        self.idempotent = req.method in IDEMPOTENT
        self.key = self.h.balance_key(req)
        self.head_bytes = self._build_head()
        req.on_gone = self.client_gone
        self._attempt()

    def _build_head(self) -> bytes:
        req, h = self.request, self.h
        headers = req.head.headers
        names = req.lower_names  # the field names in lower case, from the channel's pass over the head
        trusted = bool(h.trusted_proxies) and req.client_ip in h.trusted_proxies
        if names is not None and not self.upgrade and "connection" not in names:
            # Nothing names extra fields to drop: one pass with the names already lowered.
            out = [kv for kv, n in zip(headers, names, strict=True) if n not in _NOT_FORWARDED]
            has_host = "host" in names
        else:
            out = [(k, v) for k, v in hop_by_hop_clean(headers, keep_upgrade=self.upgrade)
                   if k.lower() not in _FRAMING and k.lower() not in _CLIENT_ONLY]
            has_host = any(k.lower() == "host" for k, _ in out)
        out += forwarded_headers(headers, req.client_ip, req.scheme, req.host_value, trusted)
        if self.upgrade:
            out.append(("Connection", "Upgrade"))
        if h.request_rules:
            apply_header_rules(out, h.request_rules, req.vars)
            out = [(k, v) for k, v in out if k.lower() not in _FRAMING]
            has_host = any(k.lower() == "host" for k, _ in out)
        if not has_host:
            out.append(("Host", h.host_header))
        if req.has_body:
            if req.body_length is not None:
                out.append(("Content-Length", str(req.body_length)))
                self.body_kind = "length"
            else:
                out.append(("Transfer-Encoding", "chunked"))
                self.body_kind = "chunked"
        return request_head(req.method, self._target().encode("latin-1"), out)

    def _target(self) -> str:
        """The request-target for the upstream (nginx ``proxy_pass`` rules)."""
        req, base = self.request, self.h.path
        query = ("?" + req.query) if req.query else ""
        uri = req.uri.decode("latin-1")
        if not base:
            return uri if uri.startswith("/") else req.path.decode("latin-1") + query
        prefix = self.ctx.rule.prefix
        path = req.norm_path
        if prefix is not None and path.startswith(prefix):
            rest = path[len(prefix):]
        else:
            rest = path.lstrip("/") if base.endswith("/") else path
        return _SAFE_PATH.sub(lambda m: "%%%02X" % ord(m.group()), base + rest) + query

    # -- choosing and connecting --------------------------------------------------------
    def _attempt(self) -> None:
        member = self.group.select(self.key, exclude=self.tried)
        if member is None:
            err = self.last_error or UpstreamError(502, f"upstream {self.group.name}: no usable member")
            if self.last_error is None:
                _log.info("reverse proxy: {url}: {why}", url=self._url(), why=err.reason)
            self._respond_error(err.status)
            return
        self.tried.add(member)
        self.member = member
        self.group.connection_started(member)
        self._counted = True
        self.started_at = self.clock.seconds()
        self.request.up_addr = member.addr_str
        pkey = (member.addr, self.h.tls_key)
        conn = self.h.pool.acquire(pkey)
        if conn is not None:
            self._use(conn, reused=True)
        else:
            self._open(pkey)

    def _open(self, pkey: Any) -> None:
        host, port = self.member.addr
        d = self.h.pool.connect(pkey, host, port, self.h.connect_timeout, self.h.tls)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: Any) -> None:
        self._connecting = None
        if self.done:
            self.h.pool.release(conn)  # never used: an idle connection for the next request
            return
        self._use(conn, reused=False)

    def _connect_failed(self, f: Failure) -> None:
        self._connecting = None
        if self.done or f.check(CancelledError):
            return
        err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
        self._member_failed(err, retry=self.h.next_upstream and self.idempotent)

    # -- sending -------------------------------------------------------------------------
    def _use(self, conn: Any, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        conn.user = self
        conn.send_head(self.request.method, self.head_bytes, self.body_kind)
        conn.watch(self.h.read_timeout)
        if self.body_kind is not None:
            self._pump = _BodyPump(self)
            conn.transport.registerProducer(self._pump, True)
            self.body_started = True
            self.request.stream_body(self)

    def body_data(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.send_body(data)

    def body_end(self) -> None:
        conn = self.conn
        if conn is None:
            return
        self.body_sent = True
        self._unregister_pump(conn)
        conn.end_body()

    def body_failed(self, status: int, message: str) -> None:
        """The client's body was bad or stopped (the channel answers): drop the upstream side."""
        self.client_gone()

    def upstream_write_paused(self) -> None:
        self.request.pause_body()
        if self._write_timer is None and self.h.write_timeout:
            self._write_timer = self.clock.callLater(self.h.write_timeout, self._write_timed_out)

    def upstream_write_resumed(self) -> None:
        self._cancel_write_timer()
        if not self.done:
            self.request.resume_body()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if not self.done:
            self._upstream_failed(UpstreamError(504, f"upstream {self.member.addr_str} did not take the "
                                                     f"request body for {self.h.write_timeout:g}s"))

    # -- receiving -----------------------------------------------------------------------
    def upstream_informational(self, head: Any) -> None:
        if head.status == 101 and self.upgrade:
            self._switch(head)
        # other 1xx (100 Continue, 103 Early Hints) are not forwarded: we answered Expect ourselves

    def upstream_response(self, head: Any) -> None:
        req = self.request
        self.got_response = True
        self.group.report_success(self.member)
        req.up_status = head.status
        if self.upgrade:
            req.close_after_response()  # the upstream did not switch protocols
        if req._disconnected:
            return
        fields, has_length, has_date = client_fields(head.headers)
        req.set_raw_response(head.status, head.reason or reason(head.status).encode(), fields,
                             has_length=has_length, has_date=has_date)
        self._head_pending = True  # written with the first body bytes, or by upstream_flush
        if self.h.rate_limit is not None:  # paced per client connection (limits.Throttle)
            bucket = connection_bucket(req.channel, self.h.rate_limit, self.clock)
            self._out = Throttle(req, bucket, self.clock)
            self._register_reader()
        # Otherwise the client's back-pressure is wired up by upstream_flush, only when
        # the response did not end within this read (most small responses do).

    def _register_reader(self) -> None:
        self._reader = _ResponsePump(self.conn, self)
        self._out.registerProducer(self._reader, True)

    def upstream_data(self, data: bytes) -> None:
        req = self.request
        if not req._disconnected:
            self._out.write(data)

    def upstream_flush(self) -> None:
        """End of what one read brought: a head still unsent goes out now, as nginx
        does (long polls, server-sent events)."""
        req = self.request
        if self.done or req._disconnected:
            return
        if self._head_pending and not req.startedWriting:
            req.write(b"")
        self._head_pending = False
        if self._reader is None and self.got_response and self.conn is not None:
            self._register_reader()  # more of the body to come: the client paces the upstream

    def upstream_end(self) -> None:
        if self.done:
            return
        self.done = True
        req = self.request
        req.on_gone = None
        req.up_time = self.clock.seconds() - self.started_at
        conn, self.conn = self.conn, None
        self._unregister_pump(conn)
        if self._reader is not None:
            self._reader = None
            if not req._disconnected:
                self._out.unregisterProducer()
        self._finish_member()
        if self.body_sent:
            self.h.pool.release(conn)
        else:
            # The upstream answered before the whole body was sent: neither
            # connection can carry another request.
            conn.user = None
            conn.close()
            req.close_after_response()
        if not req._disconnected:
            req.finish()

    def upstream_timeout(self) -> None:
        self._upstream_failed(UpstreamError(504, f"upstream {self.member.addr_str} sent nothing for "
                                                 f"{self.h.read_timeout:g}s"))

    def upstream_error(self, status: int, why: str) -> None:
        self.conn = None  # already aborted by the connection
        self._upstream_failed(UpstreamError(status, why))

    def upstream_lost(self, reason_: Optional[Failure]) -> None:
        if self.done:
            return
        conn, self.conn = self.conn, None
        if self.reused and not self.got_response and not self.body_started:
            # A pooled connection the upstream had closed meanwhile: one fresh try, same member.
            self.reused = False
            self._open(conn.key if conn is not None else (self.member.addr, self.h.tls_key))
            return
        why = reason_.getErrorMessage() if reason_ is not None else "connection lost"
        if reason_ is not None and "SSL" in type(reason_.value).__name__:
            why = f"TLS with the upstream failed: {why}"
        self._upstream_failed(UpstreamError(502, f"upstream {self.member.addr_str} closed the connection: {why}"))

    # -- failures ------------------------------------------------------------------------
    def _upstream_failed(self, err: UpstreamError) -> None:
        """Something went wrong after the connection was made."""
        if self.done:
            return
        if self.got_response:
            _log.info("reverse proxy: {url} → {member}: {why}: closing the client connection",
                      url=self._url(), member=self.member.addr_str, why=err.reason)
            self.client_gone()
            end_incomplete(self.request)  # never pass a truncated body off as complete
            return
        self._drop_conn(abort=True)
        self._member_failed(err, retry=False)

    def _member_failed(self, err: UpstreamError, retry: bool) -> None:
        """The current member failed before answering: report it, maybe try the next one."""
        _log.info("reverse proxy: {url} → {member}: {why}", url=self._url(), member=self.member.addr_str,
                  why=err.reason)
        self.group.report_failure(self.member)
        self._finish_member()
        self.last_error = err
        if retry and not self.body_started and err.status in (502, 504):
            self._attempt()
        else:
            self._respond_error(err.status)

    def _respond_error(self, status: int) -> None:
        self.done = True
        self._drop_conn(abort=True)
        self.request.on_gone = None
        respond_error(self.request, status)

    def client_gone(self) -> None:
        """The client left (or its request was torn down): drop the upstream side."""
        if self.done:
            return
        self.done = True
        self._drop_conn(abort=True)
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._finish_member()

    def _drop_conn(self, abort: bool) -> None:
        conn, self.conn = self.conn, None
        self._unregister_pump(conn)
        if self._reader is not None:
            self._reader = None
            req = self.request
            if not req._disconnected and req.producer is not None:
                self._out.unregisterProducer()
        if conn is not None:
            conn.user = None
            conn.watch(None)
            if abort:
                conn.abort()

    def _finish_member(self) -> None:
        if self._counted:
            self._counted = False
            self.group.connection_finished(self.member)

    def _unregister_pump(self, conn: Any) -> None:
        self._cancel_write_timer()
        if self._pump is not None:
            self._pump = None
            if conn is not None and conn.transport is not None:
                conn.transport.unregisterProducer()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            if self._write_timer.active():
                self._write_timer.cancel()
            self._write_timer = None

    def _url(self) -> str:
        return str(self.request.uri.decode("latin-1"))

    # -- WebSocket -----------------------------------------------------------------------
    def _switch(self, head: Any) -> None:
        """Relay the upstream's 101 and splice the two connections."""
        req, conn = self.request, self.conn
        self.done = True
        self.got_response = True
        self.group.report_success(self.member)
        req.on_gone = None
        req.up_status = req.code = 101
        self._unregister_pump(conn)
        conn.watch(None)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        out = hop_by_hop_clean(headers, keep_upgrade=True) + [("Connection", "Upgrade")]
        if req.response_rules:
            apply_header_rules(out, req.response_rules, req.vars)
        reason_ = (head.reason or b"Switching Protocols").decode("latin-1")
        raw_head = "".join([f"HTTP/1.1 101 {reason_}\r\n"] + [f"{k}: {v}\r\n" for k, v in out] + ["\r\n"])
        trailing = conn.parser.trailing
        self.conn = None
        self._counted = False
        group, member, started = self.group, self.member, self.started_at

        def finished(splice: Splice) -> None:
            req.sentLength = splice.bytes[B]
            req.end = self.clock.seconds()
            req.up_time = req.end - started
            req.log_once()
            group.connection_finished(member)

        splice = Splice(self.clock, idle_timeout=self.h.ws_idle_timeout, on_done=finished)
        channel = req.channel
        client_bytes = channel.take_over(splice)
        client = channel.transport
        client.write(raw_head.encode("latin-1"))
        if self.h.rate_limit is not None:  # what the client is sent stays paced after the switch
            client = PacedTransport(client, connection_bucket(channel, self.h.rate_limit, self.clock), self.clock)
        conn.splice = splice
        conn.user = None
        splice.attach(A, client)
        splice.attach(B, conn.transport)
        if trailing:
            splice.received(B, trailing)
        if client_bytes:
            splice.received(A, client_bytes)
