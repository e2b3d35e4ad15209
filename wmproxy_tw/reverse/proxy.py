"""One proxied request: choose a member, connect (or reuse), stream both ways.

An :class:`Exchange` is created per request by
:class:`~wmproxy_tw.reverse.handlers.ProxyHandler`.  Its life:

1. select a member of the group (``ip_hash``/``hash`` keys from the request),
   take an idle pooled connection or open one (``proxy_connect_timeout``);
   a connect failure of an idempotent request is retried on the next member
   (``proxy_next_upstream``), and every failure is reported to the group
   (passive health);
2. send the head — hop-by-hop fields and ``Proxy-Authorization`` removed,
   ``Host`` kept, ``X-Forwarded-For/-Proto/-Host`` set (an incoming
   ``X-Forwarded-*`` is kept only from ``trusted_proxies``), the location's
   ``proxy ...`` header rules applied, the matched prefix replaced when
   ``proxy_url`` has a path — then stream the body as the client sends it
   (the upstream transport's back-pressure pauses the client;
   ``proxy_write_timeout`` bounds a stall);
3. stream the response back (the client's back-pressure pauses the upstream;
   ``proxy_read_timeout`` bounds the wait between reads); 502 when the
   upstream cannot be reached or answers garbage, 504 on timeouts; once
   the response has started, a failure aborts the client connection so a
   truncated body never looks complete;
4. give the connection back to the pool when both messages ended cleanly.

A ``101`` answer to a WebSocket upgrade (``is_ws`` locations) is relayed
as the upstream sent it and both connections are spliced with
:class:`wmproxy_tw.relay.Splice`.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ..connect import UpstreamError
from ..forward.httphead import hop_by_hop_clean
from ..headers import apply_header_rules
from ..relay import A, B, Splice
from .h1 import reason, request_head

__all__ = ["Exchange", "IDEMPOTENT", "forwarded_headers"]

_log = Logger()

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_CLIENT_ONLY = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                          "forwarded", "x-real-ip"})
_SAFE_PATH = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]")


def forwarded_headers(headers: list[tuple[str, str]], client_ip: str, scheme: str, host: str,
                      trusted: bool) -> list[tuple[str, str]]:
    """The ``X-Forwarded-*`` fields to send: the incoming chain is extended
    only for a trusted peer; from anyone else it is replaced."""
    xff = [v for k, v in headers if k.lower() == "x-forwarded-for"] if trusted else []
    proto = next((v for k, v in headers if k.lower() == "x-forwarded-proto"), None) if trusted else None
    fhost = next((v for k, v in headers if k.lower() == "x-forwarded-host"), None) if trusted else None
    out = [("X-Forwarded-For", ", ".join(xff + [client_ip]))]
    out.append(("X-Forwarded-Proto", proto or scheme))
    if fhost or host:
        out.append(("X-Forwarded-Host", fhost or host))
    if trusted:
        out += [(k, v) for k, v in headers if k.lower() in ("forwarded", "x-real-ip")]
    return out


@implementer(IPushProducer)
class _ResponsePump:
    """Registered on the client request: the client's back-pressure pauses the upstream."""

    def __init__(self, ex: "Exchange") -> None:
        self.ex = ex

    def pauseProducing(self) -> None:
        self.ex.pause_upstream()

    def resumeProducing(self) -> None:
        self.ex.resume_upstream()

    def stopProducing(self) -> None:
        self.ex.client_gone(None)


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


_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                         b"proxy-authenticate", b"proxy-authorization", b"transfer-encoding"})


def _response_headers(raw: list[tuple[bytes, bytes]]) -> Headers:
    """The upstream's response fields for the client: hop-by-hop ones (and
    those its Connection field names) removed, framing left to us."""
    drop = _HOP_BY_HOP
    for k, v in raw:
        if k.lower() == b"connection":
            named = {t.strip(b" \t").lower() for t in v.split(b",")} - {b"content-length"}
            drop = drop | named
    out = Headers()
    store = out.addRawHeader
    for k, v in raw:
        if k.lower() not in drop:
            store(k, v)
    return out


class Exchange:
    """The proxying of one request (see the module docstring)."""

    def __init__(self, handler: Any, request: Any, ctx: Any) -> None:
        self.h = handler
        self.request = request
        self.ctx = ctx
        self.clock = handler.clock
        self.group = handler.group
        self.tried: set[Any] = set()
        self.member: Any = None
        self.conn: Any = None
        self.reused = False
        self.last_error: Optional[UpstreamError] = None
        self.done = False
        self.started_at = 0.0
        self.got_response = False
        self.got_bytes = False
        self.body_sent = not request.has_body
        self.body_started = False
        self.upgrade = bool(request.websocket and ctx.is_ws)
        self._counted = False
        self._pump: Optional[_BodyPump] = None
        self._reader: Optional[_ResponsePump] = None
        self._read_timer: Any = None
        self._last_read = 0.0
        self._reading_paused = False
        self._write_timer: Any = None
        self._connecting: Any = None

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        req = self.request
        self.idempotent = req.method in IDEMPOTENT
        self.key = self.h.balance_key(req)
        self.head_bytes = self._build_head()
        req.notifyFinish().addErrback(self.client_gone)
        self._attempt()

    def _build_head(self) -> bytes:
        req, h = self.request, self.h
        headers = list(req.head.headers)
        trusted = bool(h.trusted_proxies) and req.client_ip in h.trusted_proxies
        out = [(k, v) for k, v in hop_by_hop_clean(headers, keep_upgrade=self.upgrade)
               if k.lower() not in _FRAMING and k.lower() not in _CLIENT_ONLY]
        out += forwarded_headers(headers, req.client_ip, req.scheme, req.host_value, trusted)
        if self.upgrade:
            out.append(("Connection", "Upgrade"))
        if h.request_rules:
            apply_header_rules(out, h.request_rules, req.vars)
            out = [(k, v) for k, v in out if k.lower() not in _FRAMING]
        if not any(k.lower() == "host" for k, _ in out):
            out.append(("Host", h.host_header))
        self.body_kind: Optional[str] = None
        if req.has_body:
            if req.body_length is not None:
                out.append(("Content-Length", str(req.body_length)))
                self.body_kind = "length"
            else:
                out.append(("Transfer-Encoding", "chunked"))
                self.body_kind = "chunked"
        return request_head(req.method, self._target().encode("latin-1"), out)

    def _target(self) -> str:
        req, base = self.request, self.h.path
        uri = req.uri.decode("latin-1")
        if not uri.startswith("/"):  # absolute-form from the client
            uri = req.path.decode("latin-1") + (("?" + req.query) if req.query else "")
        if not base:
            return uri
        prefix = self.ctx.rule.prefix
        path = req.norm_path
        rest = path[len(prefix):] if prefix is not None and path.startswith(prefix) else path
        if prefix is None:
            rest = rest if not base.endswith("/") else rest.lstrip("/")
        new = _SAFE_PATH.sub(lambda m: "%%%02X" % ord(m.group()), base + rest)
        return new + (("?" + req.query) if req.query else "")

    # -- choosing and connecting --------------------------------------------------------
    def _attempt(self) -> None:
        member = self.group.select(self.key, exclude=self.tried)
        if member is None:
            err = self.last_error or UpstreamError(502, f"upstream {self.group.name}: no usable member")
            if self.last_error is None:
                _log.info("reverse proxy: {url}: {why}", url=self.request.uri.decode("latin-1"), why=err.reason)
            self._respond_error(err.status, err.reason)
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
            return
        self._open(pkey)

    def _open(self, pkey: Any) -> None:
        host, port = self.member.addr
        d = self.h.pool.connect(pkey, host, port, self.h.connect_timeout, self.h.tls)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: Any) -> None:
        self._connecting = None
        if self.done:
            self.h.pool.release(conn)  # never used: a fresh idle connection for the next request
            return
        self._use(conn, reused=False)

    def _connect_failed(self, f: Failure) -> None:
        self._connecting = None
        if self.done or f.check(CancelledError):
            return
        err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
        self._member_failed(err)

    def _member_failed(self, err: UpstreamError) -> None:
        """The current member failed before answering: report, maybe retry, else answer."""
        member = self.member
        _log.info("reverse proxy: {url} → {member}: {why}", url=self.request.uri.decode("latin-1"),
                  member=member.addr_str, why=err.reason)
        self.group.report_failure(member)
        self._finish_member()
        self.last_error = err
        if self.h.next_upstream and self.idempotent and not self.body_started and err.status in (502, 504):
            self._attempt()
        else:
            self._respond_error(err.status, err.reason)

    def _finish_member(self) -> None:
        if self._counted:
            self._counted = False
            self.group.connection_finished(self.member)

    # -- sending -------------------------------------------------------------------------
    def _use(self, conn: Any, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        conn.user = self
        conn.send_head(self.request.method, self.head_bytes, self.body_kind)
        self._last_read = self.clock.seconds()
        self._arm_read(self.h.read_timeout)
        if self.body_kind is not None:
            self._pump = _BodyPump(self)
            conn.transport.registerProducer(self._pump, True)
            self.body_started = True
            self.request.stream_body(self)

    def body_data(self, data: bytes) -> None:
        if not self.done and self.conn is not None:
            self.conn.send_body(data)

    def body_end(self) -> None:
        if self.done or self.conn is None:
            return
        self.body_sent = True
        self._unregister_pump_on(self.conn)
        self.conn.end_body()

    def body_failed(self, status: int, message: str) -> None:
        """The client's body was bad or stopped: the upstream got a partial request."""
        if self.done:
            return
        self.done = True
        self._cleanup(abort=True)

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
            self._fail_before_response(UpstreamError(504, f"upstream {self.member.addr_str} did not take the "
                                                          f"request body for {self.h.write_timeout:g}s"))

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            if self._write_timer.active():
                self._write_timer.cancel()
            self._write_timer = None

    # -- reading -------------------------------------------------------------------------
    def _arm_read(self, seconds: float) -> None:
        if seconds and self._read_timer is None:
            self._read_timer = self.clock.callLater(seconds, self._read_timer_fired)

    def _read_timer_fired(self) -> None:
        self._read_timer = None
        if self.done:
            return
        if self._reading_paused:
            self._arm_read(self.h.read_timeout)
            return
        left = self._last_read + self.h.read_timeout - self.clock.seconds()
        if left > 0.001:
            self._arm_read(left)
            return
        err = UpstreamError(504, f"upstream {self.member.addr_str} sent nothing for {self.h.read_timeout:g}s")
        if not self.got_response:
            self._fail_before_response(err)
        else:
            self._fail_after_response(err.reason)

    def pause_upstream(self) -> None:
        self._reading_paused = True
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.pauseProducing()

    def resume_upstream(self) -> None:
        self._reading_paused = False
        self._last_read = self.clock.seconds()
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.resumeProducing()

    def upstream_informational(self, ev: Any) -> None:
        self._last_read = self.clock.seconds()
        if ev.status == 101 and self.upgrade:
            self._switch(ev)
        # other 1xx (100 Continue, 103 Early Hints) are not forwarded: we answered Expect ourselves

    def upstream_response(self, ev: Any) -> None:
        req = self.request
        self._last_read = self.clock.seconds()
        self.got_response = self.got_bytes = True
        self.group.report_success(self.member)
        req.up_status = ev.status
        if self.upgrade:
            req.close_after_response()  # the upstream refused to switch: no reuse of this connection
        if req._disconnected:
            return
        req.responseHeaders = _response_headers(ev.headers)
        req.setResponseCode(ev.status, ev.reason or reason(ev.status).encode())
        req.write(b"")  # the head goes out now, as nginx does (long polls, server-sent events)
        self._reader = _ResponsePump(self)
        req.registerProducer(self._reader, True)

    def upstream_data(self, data: bytes) -> None:
        self._last_read = self.clock.seconds()
        req = self.request
        if not req._disconnected:
            req.write(data if type(data) is bytes else bytes(data))

    def upstream_end(self) -> None:
        if self.done:
            return
        self.done = True
        req = self.request
        req.up_time = self.clock.seconds() - self.started_at
        conn, self.conn = self.conn, None
        self._cancel_timers()
        self._unregister_pump_on(conn)
        if self._reader is not None:
            self._reader = None
            if not req._disconnected:
                req.unregisterProducer()
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

    def upstream_error(self, status: int, why: str) -> None:
        if self.done:
            return
        self.conn = None
        if not self.got_response:
            self._fail_before_response(UpstreamError(status, why), closed=True)
        else:
            self._fail_after_response(why)

    def upstream_lost(self, reason_: Failure) -> None:
        if self.done:
            return
        conn, self.conn = self.conn, None
        if self.reused and not self.got_bytes and not self.body_started:
            # A pooled connection the upstream had closed meanwhile: one fresh try, same member.
            self.reused = False
            self._cancel_timers()
            self._open(conn.key if conn is not None else (self.member.addr, self.h.tls_key))
            return
        why = reason_.getErrorMessage() if reason_ is not None else "connection lost"
        if "SSL" in type(reason_.value).__name__ if reason_ is not None else False:
            why = f"TLS with the upstream failed: {why}"
        if not self.got_response:
            self._fail_before_response(UpstreamError(502, f"upstream {self.member.addr_str} closed the "
                                                          f"connection: {why}"), closed=True)
        else:
            self._fail_after_response(f"upstream closed the connection in the middle of the body: {why}")

    # -- failures ------------------------------------------------------------------------
    def _fail_before_response(self, err: UpstreamError, closed: bool = False) -> None:
        self._cancel_timers()
        conn, self.conn = self.conn, None
        self._unregister_pump_on(conn)
        if conn is not None and not closed:
            conn.user = None
            conn.abort()
        self.got_response = False
        self._member_failed_no_retry(err)

    def _member_failed_no_retry(self, err: UpstreamError) -> None:
        _log.info("reverse proxy: {url} → {member}: {why}", url=self.request.uri.decode("latin-1"),
                  member=self.member.addr_str, why=err.reason)
        self.group.report_failure(self.member)
        self._finish_member()
        self._respond_error(err.status, err.reason)

    def _fail_after_response(self, why: str) -> None:
        """The response had started: never pass a truncated body off as complete."""
        _log.info("reverse proxy: {url} → {member}: {why}: closing the client connection",
                  url=self.request.uri.decode("latin-1"), member=self.member.addr_str, why=why)
        self.done = True
        self._cleanup(abort=True)
        req = self.request
        if not req._disconnected and req.channel is not None:
            req.channel.transport.abortConnection()

    def _respond_error(self, status: int, why: str) -> None:
        self.done = True
        self._cleanup(abort=True)
        from .handlers import respond_error

        respond_error(self.request, status)

    def client_gone(self, reason_: Any) -> None:
        """The client left (or its request was torn down): drop the upstream side."""
        if self.done:
            return None
        self.done = True
        self._cleanup(abort=True)
        return None

    def _cleanup(self, abort: bool) -> None:
        self._cancel_timers()
        conn, self.conn = self.conn, None
        self._unregister_pump_on(conn)
        if self._reader is not None:
            self._reader = None
            req = self.request
            if not req._disconnected and req.producer is not None:
                req.unregisterProducer()
        if conn is not None:
            conn.user = None
            if abort:
                conn.abort()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._finish_member()

    def _unregister_pump_on(self, conn: Any) -> None:
        self._cancel_write_timer()
        if self._pump is not None:
            self._pump = None
            if conn is not None and conn.transport is not None:
                conn.transport.unregisterProducer()

    def _cancel_timers(self) -> None:
        if self._read_timer is not None:
            if self._read_timer.active():
                self._read_timer.cancel()
            self._read_timer = None
        self._cancel_write_timer()

    # -- WebSocket -----------------------------------------------------------------------
    def _switch(self, ev: Any) -> None:
        """Relay the upstream's 101 and splice the two connections."""
        req, conn = self.request, self.conn
        self.done = True
        self.got_response = True
        self.group.report_success(self.member)
        req.up_status = 101
        req.code = 101
        self._cancel_timers()
        self._unregister_pump_on(conn)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
        out = hop_by_hop_clean(headers, keep_upgrade=True) + [("Connection", "Upgrade")]
        if req.response_rules:
            apply_header_rules(out, req.response_rules, req.vars)
        reason_ = (ev.reason or b"Switching Protocols").decode("latin-1")
        head = "".join([f"HTTP/1.1 101 {reason_}\r\n"] + [f"{k}: {v}\r\n" for k, v in out] + ["\r\n"])
        trailing = conn.parser.trailing
        self.conn = None
        group, member = self.group, self.member
        self._counted = False

        def finished(splice: Splice) -> None:
            req.sentLength = splice.bytes[B]
            req.end = self.clock.seconds()
            req.up_time = req.end - self.started_at
            req.log_once()
            group.connection_finished(member)

        splice = Splice(self.clock, idle_timeout=self.h.ws_idle_timeout, on_done=finished)
        channel = req.channel
        client_bytes = channel.take_over(splice)
        client = channel.transport
        client.write(head.encode("latin-1"))
        conn.splice = splice
        conn.user = None
        splice.attach(A, client)
        splice.attach(B, conn.transport)
        if trailing:
            splice.received(B, bytes(trailing))
        if client_bytes:
            splice.received(A, client_bytes)
