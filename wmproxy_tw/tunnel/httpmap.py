"""Public HTTP(S) entry of the tunnel server: route each request by Host to a client's stream.

Every request on a public connection (``map_http_bind``, or ``map_https_bind`` after TLS) is
parsed with h11, matched by its Host against the registered domains (exact, then ``*.``
wildcard), given the mapping's header rules, and sent over a tunnel stream to the client that
registered the domain; the client forwards the stream to its ``local_addr``.  A keep-alive
connection reuses its stream while the requests go to the same mapping.  Unknown host → 404 page
naming it; a host whose client is offline → 502 at once; a stream the client resets before
answering → 502 (504 when its local service timed out).  A WebSocket upgrade (101) turns the
connection into a raw relay (:class:`~wmproxy_tw.relay.Splice`).
"""

from __future__ import annotations

import html
from typing import Any

import h11
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from ..forward.httphead import HttpHeadError, RequestHead, body_framing, hop_by_hop_clean
from ..headers import apply_request_rules, apply_response_rules
from ..relay import A, B, Splice
from .connection import StreamResetError, TunnelStream, address_text
from .frames import ResetCode
from .server import Route, TunnelServer, normalize_host
from .session import TunnelStateError

__all__ = ["PublicHttp", "PublicHttpFactory"]

_log = Logger()

HEADER_TIMEOUT = 10.0  # a complete request head must arrive within this
KEEPALIVE_TIMEOUT = 75.0  # idle time between requests
RESPONSE_TIMEOUT = 60.0  # the mapping's service must start answering within this
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
_REASONS = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _framing(headers: list[tuple[str, str]], had: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """h11 frames bodies itself: keep Content-Length, say chunked when the sender chunked."""
    out = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
    if any(k.lower() == "transfer-encoding" for k, _ in had):
        out.append(("Transfer-Encoding", "chunked"))
    return out


def _latin(headers: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class PublicHttpFactory(Factory):
    """Serves ``map_http_bind`` (``scheme = "http"``) or ``map_https_bind`` (``"https"``)."""

    noisy = False

    def __init__(self, server: TunnelServer, scheme: str) -> None:
        self.server = server
        self.scheme = scheme

    def buildProtocol(self, addr: Any) -> Protocol:
        return PublicHttp(self.server, self.scheme)


@implementer(IHalfCloseableProtocol)
class PublicHttp(Protocol, TimeoutMixin):
    """One public HTTP connection."""

    transport: Any

    def __init__(self, server: TunnelServer, scheme: str, via_fleet: bool = False) -> None:
        self.server = server
        self.scheme = scheme
        self.via_fleet = via_fleet  # carried here from another fleet node: never carried on
        self.clock = server.reactor
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.mode = "http"  # "http" | "relay" | "closing"
        self.upstream: StreamUpstream | None = None
        self.splice: Splice | None = None
        self.closed = False
        self.upgrade = False
        self.route: Route | None = None
        self.variables: dict[str, str] = {}

    # --- connection ---

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.setTimeout(HEADER_TIMEOUT)

    def callLater(self, period: float, func: Any) -> Any:  # TimeoutMixin, on our clock
        return self.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        """No complete request head in time (408), or an idle keep-alive connection (close)."""
        if self.mode != "http" or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self._error(408, "request head not received in time")
        else:  # idle keep-alive connection
            self._close()

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "relay":
            assert self.splice is not None
            self.splice.received(A, data)
        elif self.mode in ("http", "lookup"):
            self.conn.receive_data(data)
            self._events()

    def readConnectionLost(self) -> None:
        if self.mode == "relay":
            assert self.splice is not None
            self.splice.read_closed(A)
        elif self.mode in ("http", "lookup"):
            self.conn.receive_data(b"")
            self._events()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.setTimeout(None)
        if self.splice is not None:
            self.splice.lost(A, reason)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close(abort=True)

    def _close(self) -> None:
        self.mode = "closing"
        self.setTimeout(None)
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.done:
            upstream.close()
        elif upstream is not None:
            upstream.close(abort=True)
        if not self.closed:
            self.transport.loseConnection()

    # --- requests ---

    def _events(self) -> None:
        conn = self.conn
        while self.mode == "http":
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._error(exc.error_status_hint, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                self.transport.pauseProducing()  # until the current response is sent
                return
            if isinstance(event, h11.Request):
                self.setTimeout(None)
                self._request(event)
            elif isinstance(event, h11.Data | h11.EndOfMessage):
                if self.upstream is not None:
                    self.upstream.send(event)
            elif isinstance(event, h11.ConnectionClosed):
                if self.upstream is None or self.upstream.done:
                    self._close()
                return

    def _request(self, ev: h11.Request) -> None:
        if len(ev.headers) > MAX_HEADERS:
            self._error(431, f"more than {MAX_HEADERS} header fields")
            return
        headers = _latin(ev.headers)
        try:  # CL+TE, differing CL, obfuscated TE: 400, never passed to a mapping
            body_framing(RequestHead(ev.method.decode("latin-1"), ev.target.decode("latin-1"),
                                     "HTTP/" + ev.http_version.decode(), tuple(headers)))
        except HttpHeadError as exc:
            self._error(exc.status, f"bad request: {exc}")
            return
        host = next((v for k, v in headers if k.lower() == "host"), "")
        target = ev.target.decode("latin-1")
        if not host and "://" in target:
            host = target.split("://", 1)[1].split("/", 1)[0]
        key = normalize_host(host)
        route = self.server.registry.find(self.scheme, key)
        if route is None or not route.conn.mux.is_open:
            fleet = self.server.fleet
            if fleet is not None and not self.via_fleet:
                # another fleet node may hold the client: hold this request until we know
                self.mode = "lookup"
                self.transport.pauseProducing()
                d = fleet.find(self.scheme, key)
                d.addTimeout(self.server.cfg.connect_timeout, self.clock, lambda *_: None)
                d.addCallback(self._found, ev, headers, host, key, target, route)
                d.addErrback(self._lookup_failed)
                return
            self._no_route(route, key)
            return
        self._forward(ev, headers, host, key, target, route)

    def _found(self, remote: Any, ev: h11.Request, headers: list[tuple[str, str]], host: str,
               key: str, target: str, route: Route | None) -> None:
        if self.closed or self.mode != "lookup":
            return
        self.mode = "http"
        self.transport.resumeProducing()
        if remote is None:
            self._no_route(route, key)
            return
        self._forward(ev, headers, host, key, target, remote)
        self._events()

    def _lookup_failed(self, failure: Failure) -> None:
        _log.failure("tunnel {scheme}: fleet lookup", failure, scheme=self.scheme)
        if not self.closed and self.mode == "lookup":
            self.mode = "http"
            self._error(502, "the fleet lookup failed")

    def _no_route(self, route: Route | None, key: str) -> None:
        owner = self.server.registry.offline_owner(self.scheme, key)
        if route is not None or owner is not None:
            self._error(502, f"the tunnel client serving {key} is offline")
        else:
            self._not_found(key)

    def _forward(self, ev: h11.Request, headers: list[tuple[str, str]], host: str, key: str,
                 target: str, route: Any) -> None:
        upgrade = any(k.lower() == "upgrade" and v.lower() == "websocket" for k, v in headers)
        out = _framing(hop_by_hop_clean(headers, keep_upgrade=upgrade), headers)
        if upgrade:
            out.append(("Connection", "Upgrade"))
        path = target if target.startswith("/") else "/" + target.split("://", 1)[-1].partition("/")[2]
        self.variables = {
            "client_ip": str(getattr(self.peer, "host", "")),
            "client_addr": address_text(self.peer) or "",
            "host": host, "url": f"{self.scheme}://{host}{path}", "path": path.split("?", 1)[0],
            "scheme": self.scheme,
        }
        out = apply_request_rules(out, route.rules, self.variables)
        request = h11.Request(method=ev.method, target=path.encode("latin-1"), headers=_bytes(out))
        self.upgrade = upgrade
        self.route = route
        up = self.upstream
        if up is not None and up.route is route and up.reusable():
            up.start(request)
            return
        if up is not None:
            self.upstream = None
            up.close()
        try:
            stream = route.open(self.peer)
        except TunnelStateError as exc:
            self._error(503, f"the tunnel to {key} cannot take another stream: {exc}")
            return
        if stream is None:
            self._error(502, f"the tunnel client serving {key} is offline")
            return
        self.upstream = StreamUpstream(self, route, stream)
        self.upstream.start(request)

    # --- answers ---

    def _not_found(self, host: str) -> None:
        name = html.escape(host or "(no Host header)")
        body = (f"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>\n"
                f"<h1>404 Not Found</h1>\n<p>No tunnel mapping serves the host <b>{name}</b> "
                f"on this server.</p>\n</body></html>\n").encode()
        self._respond(404, body, "text/html; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        _log.info("tunnel {scheme} {client}: {status} {message}", scheme=self.scheme,
                  client=address_text(self.peer), status=status, message=message)
        self._respond(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _respond(self, status: int, body: bytes, ctype: str) -> None:
        """A complete short answer, then close the connection."""
        conn = self.conn
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Connection", "close")]
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                data = conn.send(h11.Response(status_code=status, headers=_bytes(headers),
                                              reason=_REASONS.get(status, "").encode()))
                data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                self.transport.write(data)
            except h11.LocalProtocolError:
                pass
        self._close()

    # --- called by the upstream ---

    def upstream_failed(self, status: int, message: str) -> None:
        if self.conn.our_state is h11.SEND_RESPONSE:
            self._error(status, message)
        else:  # the response had started: never pass a truncated body off as complete
            self.mode = "closing"
            if not self.closed:
                self.transport.abortConnection()

    def upstream_response(self, ev: h11.Response | h11.InformationalResponse) -> None:
        headers = _latin(ev.headers)
        switching = ev.status_code == 101 and self.upgrade
        out = _framing(hop_by_hop_clean(headers, keep_upgrade=switching), headers)
        if switching:
            out.append(("Connection", "Upgrade"))
        assert self.route is not None
        out = apply_response_rules(out, self.route.rules, self.variables)
        if isinstance(ev, h11.InformationalResponse):
            if ev.status_code == 101 and not switching:
                return
            self.transport.write(self.conn.send(h11.InformationalResponse(
                status_code=ev.status_code, headers=_bytes(out), reason=ev.reason)))
            if switching:
                self._switch_to_relay()
            return
        self.transport.write(self.conn.send(h11.Response(
            status_code=ev.status_code, headers=_bytes(out), reason=ev.reason)))

    def upstream_data(self, data: bytes) -> None:
        self.transport.write(self.conn.send(h11.Data(data=data)))

    def upstream_done(self) -> None:
        conn = self.conn
        self.transport.write(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self._close()
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self.setTimeout(KEEPALIVE_TIMEOUT)
            self.transport.resumeProducing()
            self._events()

    def _switch_to_relay(self) -> None:
        up = self.upstream
        assert up is not None
        self.upstream = None
        splice = Splice(self.clock, idle_timeout=self.server.cfg.idle_timeout)
        self.splice = splice
        self.mode = "relay"
        trailing_client, _ = self.conn.trailing_data
        trailing_up = up.detach_to(splice)
        splice.attach(A, self.transport)
        self.transport.resumeProducing()
        if trailing_up:
            splice.received(B, trailing_up)
        if trailing_client:
            splice.received(A, bytes(trailing_client))


@implementer(IHalfCloseableProtocol)
class StreamUpstream(Protocol):
    """The h11 client side of a request relayed over a tunnel stream."""

    transport: Any

    def __init__(self, client: PublicHttp, route: Route, stream: TunnelStream) -> None:
        self.client = client
        self.route = route
        self.h11 = h11.Connection(h11.CLIENT)
        self.done = False
        self.got_response = False
        self.splice: Splice | None = None
        self._timer: IDelayedCall | None = None
        self._gone = False
        self._let_go = False  # closed by us: its end is no failure
        self._registered = False
        stream.attach(self)

    def connectionMade(self) -> None:
        # back-pressure both ways: a full stream pauses the public socket and vice versa
        self.client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(self.client.transport, True)
        self._registered = True

    def reusable(self) -> bool:
        return (not self._gone and self.h11.our_state is h11.IDLE
                and self.h11.their_state is h11.IDLE)

    def start(self, request: h11.Request) -> None:
        self.done = False
        self.got_response = False
        self.send(request)
        self._timer = self.client.clock.callLater(RESPONSE_TIMEOUT, self._response_timeout)

    def send(self, event: Any) -> None:
        if self._gone:
            return
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as exc:
            self.client.upstream_failed(502, f"cannot forward the request: {exc}")
            return
        if data:
            self.transport.write(data)

    def _response_timeout(self) -> None:
        self._timer = None
        if not self.got_response and self.client.upstream is self:
            self.client.upstream_failed(504, f"no response from {self.route.owner} in time")
            self.close(abort=True)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(B, data)
            return
        self.h11.receive_data(data)
        self._events()

    def readConnectionLost(self) -> None:
        if self.splice is not None:
            self.splice.read_closed(B)
            return
        self.h11.receive_data(b"")
        self._events()

    def writeConnectionLost(self) -> None:
        pass

    def _events(self) -> None:
        while self.splice is None and self.client.upstream is self:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.client.upstream_failed(502, f"bad response through the tunnel: {exc}")
                self.close(abort=True)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Response | h11.InformationalResponse):
                if isinstance(ev, h11.Response) or ev.status_code == 101:
                    self.got_response = True
                    self._cancel_timer()
                self.client.upstream_response(ev)
            elif isinstance(ev, h11.Data):
                self.client.upstream_data(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self.done = True
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    self.close()
                self.client.upstream_done()
                return
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _unregister(self) -> None:
        if not self._registered:
            return
        self._registered = False
        self.transport.unregisterProducer()
        if not self.client.closed:
            self.client.transport.unregisterProducer()

    def detach_to(self, splice: Splice) -> bytes:
        """Hand the stream to a raw relay after a 101: return the bytes h11 had not parsed."""
        self.splice = splice
        self._cancel_timer()
        trailing, _ = self.h11.trailing_data
        self._unregister()
        splice.attach(B, self.transport)
        return bytes(trailing)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._gone = True
        self._cancel_timer()
        if self.splice is not None:
            self.splice.lost(B, reason)
            return
        client = self.client
        if client.upstream is not self or self._let_go:
            return
        self._registered = False
        if not client.closed:
            client.transport.unregisterProducer()
        if self.done:
            return
        client.upstream = None
        exc = reason.value if reason is not None else None
        if isinstance(exc, StreamResetError) and exc.code == ResetCode.CONNECT_TIMEOUT:
            client.upstream_failed(504, f"{self.route.owner}: its local service timed out")
        elif isinstance(exc, StreamResetError) and exc.code == ResetCode.CONNECT_FAILED:
            client.upstream_failed(502, f"{self.route.owner}: its local service refused the connection")
        else:
            client.upstream_failed(502, f"{self.route.owner}: the stream ended before a complete response")

    def close(self, abort: bool = False) -> None:
        """Let go of the stream (abort: reset it, dropping what it still had)."""
        if self._gone or self._let_go or self.transport is None:
            return
        self._let_go = True
        self._cancel_timer()
        self._unregister()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()
