"""The forward proxy: one port, HTTP / HTTPS CONNECT / SOCKS5 by first byte.

The byte-level work is done by sans-IO machines: :mod:`.socks5` for SOCKS5,
h11 for HTTP/1.1 framing (both directions, keep-alive, chunked bodies), and
:mod:`.httphead` for request targets, proxy auth and hop-by-hop rules.  This
module only wires them to transports; tunnels are handed to the one relay
(:class:`wmproxy_tw.relay.Splice`).
"""

from __future__ import annotations

import hmac
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config.grammar import Address
from ..config.model import Proxy
from ..connect import TargetPolicy, UpstreamError, connect, quiet_factory
from ..observe.stats import NULL_STATS, Stats
from ..h11compat import h11
from ..relay import CLOSE_GRACE, A, B, Splice, SpliceProtocol
from . import socks5
from .httphead import (
    HttpHeadError,
    RequestHead,
    body_framing,
    hop_by_hop_clean,
    parse_basic_auth,
    parse_proxy_target,
)
from .udp import UdpAssociation

__all__ = ["ForwardFactory", "ForwardProtocol", "BasicAuth"]

_log = Logger()

RESPONSE_TIMEOUT = 60.0  # upstream must start answering within this
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
VIA = "1.1 wmproxy-tw"
_VIA = VIA.encode()


class BasicAuth:
    """Username/password check in constant time."""

    def __init__(self, username: str, password: str) -> None:
        self._user = username.encode()
        self._pass = password.encode()

    def check(self, username: bytes, password: bytes) -> bool:
        ok_user = hmac.compare_digest(username, self._user)
        ok_pass = hmac.compare_digest(password, self._pass)
        return ok_user and ok_pass

    def check_header(self, value: Optional[str]) -> bool:
        creds = parse_basic_auth(value)
        if creds is None:
            return False
        return self.check(creds[0].encode("utf-8", "surrogateescape"), creds[1].encode("utf-8", "surrogateescape"))


class ForwardFactory(Factory):
    """Builds one :class:`ForwardProtocol` per accepted client."""

    noisy = False

    def __init__(self, reactor: Any, cfg: Proxy, own_listeners: tuple[Address, ...] = (),
                 stats: Stats = NULL_STATS) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.stats = stats
        self.meter = stats.meter("forward")
        denied = cfg.deny_targets if cfg.deny_targets is not None else own_listeners
        self.policy = TargetPolicy(denied)
        self.auth = BasicAuth(cfg.username, cfg.password) if cfg.username is not None and cfg.password is not None else None
        self.flags = cfg.flag
        self.active: set[ForwardProtocol] = set()
        self.draining = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        host = getattr(addr, "host", "")
        if self.cfg.allow_ip and host not in self.cfg.allow_ip:
            _log.info("forward proxy: {client} not in allow_ip: closed", client=host)
            return None
        if host in self.cfg.deny_ip:
            _log.info("forward proxy: {client} in deny_ip: closed", client=host)
            return None
        proto = ForwardProtocol(self)
        proto.factory = self
        return proto

    def drain(self) -> None:
        """Graceful stop: close idle connections; busy ones close after their response."""
        self.draining = True
        for proto in list(self.active):
            proto.drain()

    def count(self, kind: str, status: int) -> None:
        """One request answered (``kind``: http | socks5)."""
        self.stats.request("forward", kind, "", status)


@implementer(IHalfCloseableProtocol)
class ForwardProtocol(Protocol):
    """One client connection of the forward proxy."""

    transport: Any

    def __init__(self, factory: ForwardFactory) -> None:
        self.f = factory
        self.reactor = factory.reactor
        self.mode = "detect"
        self.splice: Optional[Splice] = None
        self.socks: Optional[socks5.Socks5Server] = None
        self.udp: Optional[UdpAssociation] = None
        self.http: Optional[h11.Connection] = None
        self.upstream: Optional[HttpUpstream] = None
        self.pending_upgrade = False
        self._deadline: Optional[IDelayedCall] = None
        self._closed = False

    # -- connection --------------------------------------------------------
    def connectionMade(self) -> None:
        self.f.active.add(self)
        self.peer: Any = self.transport.getPeer()
        self._arm(self.f.cfg.header_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.reactor.callLater(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.mode == "http" and self.http is not None and self.http.their_state is h11.SEND_BODY:
            return
        if self.mode == "http" and self.http is not None:
            if self.http.their_state is h11.IDLE and self.http.our_state is h11.IDLE and self._partial():
                self._http_error(408, "request head not received in time")
            else:
                self._close()  # idle keep-alive connection: a quiet close
            return
        _log.debug("forward proxy: {client} timed out in {mode}", client=self.peer.host, mode=self.mode)
        self._abort()

    def _partial(self) -> bool:
        """True when part of a request head is buffered (slow client), not just idle."""
        assert self.http is not None
        return bool(self.http.trailing_data[0])

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "relay":
            assert self.splice is not None
            self.splice.received(A, data)
        elif self.mode == "http":
            self._http_data(data)
        elif self.mode == "socks":
            self._socks_data(data)
        elif self.mode == "detect":
            if data[:1] == b"\x05":
                if "socks5" not in self.f.flags:
                    self._abort()
                    return
                self.mode = "socks"
                self.socks = socks5.Socks5Server(self.f.auth is not None, self.f.auth.check if self.f.auth else None)
                self._socks_data(data)
            else:
                if not ({"http", "https"} & self.f.flags):
                    self._abort()
                    return
                self.mode = "http"
                self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
                self._http_data(data)
        # "connecting", "udp", "closing": input is ignored (the transport is paused)

    def readConnectionLost(self) -> None:
        if self.mode == "relay" and self.splice is not None:
            self.splice.read_closed(A)
        elif self.mode == "http" and self.http is not None:
            self._http_data(b"")
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        self._disarm()
        self.f.active.discard(self)
        if self.splice is not None:
            self.splice.lost(A, reason)
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _close(self) -> None:
        if not self._closed:
            self.transport.loseConnection()

    def _abort(self) -> None:
        if not self._closed:
            self.transport.abortConnection()

    def _close_incomplete(self) -> None:
        """A response that cannot be completed: send what was written, then close without the
        body's end (fewer bytes than Content-Length, no last chunk); abort after CLOSE_GRACE."""
        if self._closed or self.mode == "closing":
            return
        self.mode = "closing"
        self.transport.loseConnection()
        self._deadline = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def drain(self) -> None:
        """Close now if between requests; otherwise after the current response."""
        if self.mode == "detect":
            self._close()
        elif self.mode == "http" and self.http is not None:
            if self.http.their_state is h11.IDLE and self.http.our_state is h11.IDLE and not self._partial():
                self._close()

    # -- tunnels (CONNECT and SOCKS5 CONNECT) --------------------------------
    def _open_tunnel(self, host: str, port: int, on_ok: Any, on_fail: Any, leftover: bytes = b"") -> None:
        self.mode = "connecting"
        self.transport.pauseProducing()
        splice = Splice(self.reactor, idle_timeout=self.f.cfg.idle_timeout, meter=self.f.meter)
        started = self.reactor.seconds()
        d: Deferred[Protocol] = connect(
            self.reactor, host, port, quiet_factory(lambda: SpliceProtocol(splice, B)),
            timeout=self.f.cfg.connect_timeout, policy=self.f.policy,
        )

        def ok(proto: Any) -> None:
            if self._closed:
                proto.transport.loseConnection()
                return
            self.mode = "relay"
            self.splice = splice
            self.f.stats.upstream_latency("forward", "direct", "", self.reactor.seconds() - started)
            extra = on_ok(proto) or b""
            splice.attach(A, self.transport)
            if leftover or extra:
                splice.received(A, leftover + extra)
            self.transport.resumeProducing()

        def fail(f: Failure) -> None:
            err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
            _log.info("forward proxy: {client} → {target}: {why}", client=self.peer.host,
                      target=f"{host}:{port}", why=err.reason)
            if not self._closed:
                self.transport.resumeProducing()
                on_fail(err)

        d.addCallbacks(ok, fail)

    # -- SOCKS5 ----------------------------------------------------------------
    def _socks_data(self, data: bytes) -> None:
        assert self.socks is not None
        try:
            events = self.socks.feed(data)
        except socks5.Socks5Error as e:
            _log.info("socks5: {client}: {why}", client=self.peer.host, why=e.message)
            self.f.count("socks5", 400)
            if e.response:
                self.transport.write(e.response)
            self._close()
            self.mode = "closing"
            return
        for ev in events:
            if isinstance(ev, socks5.SendBytes):
                self.transport.write(ev.data)
            elif isinstance(ev, socks5.AuthFailed):
                _log.info("socks5: {client}: bad credentials", client=self.peer.host)
                self.f.count("socks5", 407)
                self.mode = "closing"
                self._close()
                return
            elif isinstance(ev, socks5.Request):
                self._disarm()
                self._socks_request(ev)
                return

    def _socks_request(self, req: socks5.Request) -> None:
        assert self.socks is not None
        sk = self.socks
        if req.cmd == socks5.CMD_CONNECT:
            if req.port == 0:
                self._socks_fail(socks5.REP_CONNECTION_NOT_ALLOWED)
                return
            leftover = sk.take_leftover()

            def ok(proto: Any) -> None:
                local = proto.transport.getHost()
                bind_host = getattr(local, "host", "0.0.0.0")
                self.transport.write(sk.reply(socks5.REP_SUCCEEDED, bind_host, getattr(local, "port", 0)))
                self.f.count("socks5", 200)

            def fail(err: UpstreamError) -> None:
                code = {403: socks5.REP_CONNECTION_NOT_ALLOWED, 504: socks5.REP_TTL_EXPIRED}.get(err.status)
                if code is None:
                    code = socks5.REP_CONNECTION_REFUSED if "refused" in err.reason else socks5.REP_HOST_UNREACHABLE
                self._socks_fail(code)

            self._open_tunnel(req.host, req.port, ok, fail, leftover)
        elif req.cmd == socks5.CMD_UDP_ASSOCIATE:
            local = self.transport.getHost()
            try:
                self.udp = UdpAssociation.open(self.reactor, local.host, self.peer.host, self.f.policy,
                                               idle_timeout=self.f.cfg.idle_timeout)
            except OSError as e:
                _log.info("socks5: cannot open a UDP relay: {e}", e=e)
                self._socks_fail(socks5.REP_GENERAL_FAILURE)
                return
            self.mode = "udp"
            bound = self.udp.port.getHost()
            self.transport.write(sk.reply(socks5.REP_SUCCEEDED, bound.host, bound.port))
            self.f.count("socks5", 200)
        else:
            self._socks_fail(socks5.REP_COMMAND_NOT_SUPPORTED)

    def _socks_fail(self, code: int) -> None:
        assert self.socks is not None
        self.f.count("socks5", _SOCKS_STATUS.get(code, 502))
        self.transport.write(self.socks.reply(code))
        self.mode = "closing"
        self._close()

    # -- HTTP --------------------------------------------------------------------
    def _http_data(self, data: bytes) -> None:
        assert self.http is not None
        if data:
            self.http.receive_data(data)
        else:
            self.http.receive_data(b"")  # EOF
        self._http_events()

    def _http_events(self) -> None:
        conn = self.http
        assert conn is not None
        while self.mode == "http":
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                self._http_error(status, f"bad request: {e}")
                return
            if event is h11.NEED_DATA:
                if conn.their_state is h11.DONE and conn.our_state is h11.DONE:
                    return
                return
            if event is h11.PAUSED:
                # the current response is still being sent: stop reading until then
                self.transport.pauseProducing()
                return
            if isinstance(event, h11.Request):
                self._disarm()
                self._http_request(event)
            elif isinstance(event, h11.Data):
                self.f.meter.inbound(len(event.data))
                if self.upstream is not None:
                    self.upstream.send(event)
            elif isinstance(event, h11.EndOfMessage):
                if self.upstream is not None:
                    self.upstream.send(event)
            elif isinstance(event, h11.ConnectionClosed):
                if self.upstream is None or self.upstream.done:
                    self._close()
                return

    def _http_error(self, status: int, message: str, extra: list[tuple[str, str]] | None = None) -> None:
        """Answer with a short plain-text error, then close."""
        conn = self.http
        self.f.count("http", status)
        body = (message.strip() + "\n").encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                   ("Connection", "close")] + (extra or [])
        if conn is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
                out += conn.send(h11.Data(data=body)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                self.transport.write(out)
            except h11.LocalProtocolError:
                self.transport.write(_raw_response(status, headers, body))
        elif conn is None or conn.our_state is not h11.SEND_BODY:
            self.transport.write(_raw_response(status, headers, body))
        self.mode = "closing"
        self._close()

    def _http_request(self, ev: h11.Request) -> None:
        if len(ev.headers) > MAX_HEADERS:
            self._http_error(431, f"more than {MAX_HEADERS} header fields")
            return
        method = ev.method.decode("ascii", "replace")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
        head = RequestHead(method, ev.target.decode("latin-1"), "HTTP/" + ev.http_version.decode(), tuple(headers))
        if self.f.auth is not None and not self.f.auth.check_header(head.get("Proxy-Authorization")):
            _log.info("forward proxy: {client}: {m} without valid credentials", client=self.peer.host, m=method)
            self._http_error(407, "proxy authentication required",
                             [("Proxy-Authenticate", 'Basic realm="wmproxy"')])
            return
        try:
            target = parse_proxy_target(head)
            body_framing(head)  # CL+TE, differing CL, obfuscated TE: 400, never passed upstream
        except HttpHeadError as e:
            self._http_error(e.status, str(e))
            return
        if target.kind == "origin":
            self._http_error(400, "this is a proxy: send absolute-form requests (GET http://host/...) or CONNECT")
            return
        assert target.host is not None and target.port is not None
        if target.kind == "connect":
            if "https" not in self.f.flags:
                self._http_error(405, "CONNECT is not enabled on this proxy")
                return
            self._http_connect(target.host, target.port)
            return
        if "http" not in self.f.flags:
            self._http_error(405, "plain HTTP proxying is not enabled on this proxy")
            return
        upgrade = (head.get("Upgrade") or "").lower() == "websocket"
        # h11 validated every field when it parsed them; the method and target are checked again
        req = h11.Request(method=ev.method, target=(target.path or "/").encode("latin-1"),
                          headers=_forwarded(headers, upgrade), _parsed=True)
        self.pending_upgrade = upgrade
        key = (target.host, target.port)
        up = self.upstream
        if up is not None and up.key == key and up.reusable():
            up.start(req)
        else:
            if up is not None:
                up.close()
            self.upstream = HttpUpstream(self, key)
            self.upstream.start(req)

    def _http_connect(self, host: str, port: int) -> None:
        conn = self.http
        assert conn is not None

        try:
            end = conn.next_event()
        except h11.RemoteProtocolError as e:
            self._http_error(400, f"bad request: {e}")
            return
        if not isinstance(end, h11.EndOfMessage):
            self._http_error(400, "a CONNECT request has no body")
            return

        def ok(proto: Protocol) -> bytes:
            self.transport.write(conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection Established")))
            self.f.count("http", 200)
            # bytes the client sent after the CONNECT head belong to the tunnel
            trailing, _closed = conn.trailing_data
            return bytes(trailing)

        def fail(err: UpstreamError) -> None:
            self.mode = "http"
            self._http_error(err.status, err.reason)

        self._open_tunnel(host, port, ok, fail)

    # called by HttpUpstream ------------------------------------------------------
    def upstream_failed(self, err: UpstreamError) -> None:
        conn = self.http
        assert conn is not None
        if conn.our_state is h11.SEND_RESPONSE:
            self._http_error(err.status, err.reason)
        else:
            # the response had started: never pass a truncated body off as complete
            self._close_incomplete()

    def upstream_response(self, ev: h11.Response | h11.InformationalResponse) -> None:
        conn = self.http
        assert conn is not None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
        switching = ev.status_code == 101 and self.pending_upgrade
        hdrs = _forwarded(headers, switching)
        if isinstance(ev, h11.InformationalResponse):
            if ev.status_code == 101 and not switching:
                return
            self.transport.write(conn.send(h11.InformationalResponse(status_code=ev.status_code, headers=hdrs,
                                                                     reason=ev.reason, _parsed=True)))
            if switching:
                self.f.count("http", 101)
                self._switch_to_relay()
            return
        self.f.count("http", ev.status_code)
        self.transport.write(conn.send(h11.Response(status_code=ev.status_code, headers=hdrs, reason=ev.reason,
                                                    _parsed=True)))

    def upstream_data(self, data: bytes) -> None:
        assert self.http is not None
        self.f.meter.outbound(len(data))
        self.transport.write(self.http.send(h11.Data(data=data)))

    def upstream_done(self) -> None:
        conn = self.http
        assert conn is not None
        self.transport.write(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE or self.f.draining:
            self.mode = "closing"
            self._close()
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._arm(self.f.cfg.keepalive_timeout)
            self.transport.resumeProducing()
            self._http_events()

    def _switch_to_relay(self) -> None:
        """A WebSocket upgrade was accepted upstream: splice the raw bytes."""
        assert self.http is not None and self.upstream is not None
        up = self.upstream
        self.upstream = None
        splice = Splice(self.reactor, idle_timeout=self.f.cfg.idle_timeout, meter=self.f.meter)
        self.splice = splice
        self.mode = "relay"
        trailing_client, _ = self.http.trailing_data
        trailing_up = up.detach_to(splice)
        splice.attach(A, self.transport)
        if trailing_up:
            splice.received(B, trailing_up)
        if trailing_client:
            splice.received(A, bytes(trailing_client))


class HttpUpstream(Protocol):
    """One upstream HTTP/1.1 connection serving a client's requests in turn."""

    transport: Any

    def __init__(self, client: ForwardProtocol, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT)
        self.connected = False
        self.queue: list[Any] = []
        self.done = False
        self.closed = False
        self.got_response = False
        self._timer: Optional[IDelayedCall] = None
        self.splice: Optional[Splice] = None
        self.sent_at: Optional[float] = None

    def reusable(self) -> bool:
        return bool(not self.closed and self.connected and self.h11.our_state is h11.IDLE
                    and self.h11.their_state is h11.IDLE)

    def start(self, req: h11.Request) -> None:
        self.done = False
        self.got_response = False
        self.sent_at = self.client.reactor.seconds()
        if self.connected:
            self.send(req)
            return
        self.queue.append(req)
        if len(self.queue) == 1:
            host, port = self.key
            d = connect(self.client.reactor, host, port, quiet_factory(lambda: self),
                        timeout=self.client.f.cfg.connect_timeout, policy=self.client.f.policy)
            d.addErrback(self._connect_failed)

    def _connect_failed(self, f: Failure) -> None:
        self.closed = True
        err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
        if self.client.upstream is self:
            self.client.upstream = None
            self.client.upstream_failed(err)

    def connectionMade(self) -> None:
        if self.client._closed:
            self.transport.loseConnection()
            return
        self.connected = True
        self.client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(self.client.transport, True)
        queue, self.queue = self.queue, []
        for ev in queue:
            self.send(ev)

    def send(self, ev: Any) -> None:
        if not self.connected:
            self.queue.append(ev)
            return
        try:
            data = self.h11.send(ev)
        except h11.LocalProtocolError as e:
            self.client.upstream_failed(UpstreamError(502, f"cannot forward the request: {e}"))
            return
        if data:
            self.transport.write(data)
        if isinstance(ev, (h11.Request,)) and self._timer is None:
            self._timer = self.client.reactor.callLater(RESPONSE_TIMEOUT, self._response_timeout)

    def _response_timeout(self) -> None:
        self._timer = None
        if not self.got_response:
            self.client.upstream_failed(UpstreamError(504, f"no response from {self.key[0]}:{self.key[1]} in time"))
            self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(B, data)
            return
        self.h11.receive_data(data)
        self._events()

    def _events(self) -> None:
        while self.splice is None:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self.client.upstream_failed(UpstreamError(502, f"bad response from upstream: {e}"))
                self.close()
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, (h11.Response, h11.InformationalResponse)):
                if isinstance(ev, h11.Response) or ev.status_code == 101:
                    if not self.got_response and self.sent_at is not None:
                        f = self.client.f
                        f.stats.upstream_latency("forward", "direct", "", f.reactor.seconds() - self.sent_at)
                    self.got_response = True
                    if self._timer is not None and self._timer.active():
                        self._timer.cancel()
                    self._timer = None
                self.client.upstream_response(ev)
            elif isinstance(ev, h11.Data):
                self.client.upstream_data(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self.done = True
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                self.client.upstream_done()
                return
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def detach_to(self, splice: Splice) -> bytes:
        """Hand this connection to a splice (after a 101): return unread bytes."""
        self.splice = splice
        trailing, _ = self.h11.trailing_data
        _unregister(self.client.transport, self.transport)
        _unregister(self.transport, self.client.transport)
        splice.attach(B, self.transport)
        return bytes(trailing)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.splice is not None:
            self.splice.lost(B, reason)
            return
        _unregister(self.client.transport, self.transport)
        if self.done or self.client.upstream is not self:
            return
        try:
            self.h11.receive_data(b"")
        except h11.RemoteProtocolError:
            pass
        self._events()
        if not self.done and self.client.upstream is self:
            self.client.upstream_failed(UpstreamError(502, "upstream closed the connection"))

    def close(self) -> None:
        if self.connected and not self.closed:
            _unregister(self.client.transport, self.transport)
            _unregister(self.transport, self.client.transport)
            self.transport.loseConnection()
        self.closed = True


def _forwarded(headers: list[tuple[str, str]], upgrade: bool) -> list[tuple[bytes, bytes]]:
    """The fields to pass on: hop-by-hop ones dropped, framing re-stated, Via added.

    The input comes from h11's parser (every name and value already checked),
    so the event built from the result may skip h11's validation (``_parsed``).
    """
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hop_by_hop_clean(headers, keep_upgrade=upgrade)
           if k.lower() != "transfer-encoding"]
    if any(k.lower() == "transfer-encoding" for k, _ in headers):
        out.append((b"Transfer-Encoding", b"chunked"))
    if upgrade:
        out.append((b"Connection", b"Upgrade"))
    out.append((b"Via", _VIA))
    return out


def _unregister(consumer: Any, producer: Any) -> None:
    """Unregister ``producer`` from ``consumer`` if it is the one registered."""
    if getattr(consumer, "producer", None) is producer:
        consumer.unregisterProducer()


#: SOCKS5 replies counted as the HTTP status a client of the HTTP proxy would get.
_SOCKS_STATUS = {socks5.REP_CONNECTION_NOT_ALLOWED: 403, socks5.REP_TTL_EXPIRED: 504,
                 socks5.REP_COMMAND_NOT_SUPPORTED: 501, socks5.REP_GENERAL_FAILURE: 500}

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 407: b"Proxy Authentication Required",
            408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
            502: b"Bad Gateway", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


def _raw_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, b'').decode()}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
