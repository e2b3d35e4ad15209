"""The forward proxy: one port, HTTP / HTTPS CONNECT / SOCKS5 by first byte.

The byte-level work is done by sans-IO machines: :mod:`.socks5` for SOCKS5;
for HTTP/1.1, :mod:`.httphead` (request heads, targets, body framing, proxy
auth, hop-by-hop rules) on the client side and the small parsers of
:mod:`wmproxy_tw.reverse.h1` (body decoders, the upstream response parser)
— about a quarter of the CPU per request h11 took on both legs.  This
module only wires them to transports; tunnels are handed to the one relay
(:class:`wmproxy_tw.relay.Splice`).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
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
from ..relay import CLOSE_GRACE, A, B, Splice, SpliceProtocol
from . import socks5
from ..reverse.h1 import (DATA, END, LAST_CHUNK, RESPONSE, BodyError, ChunkedDecoder, LengthDecoder, ResponseError,
                         ResponseHead, ResponseParser, chunk, reason, request_head)
from .httphead import (IDEMPOTENT, HttpHeadError, RequestHead, RequestHeadParser, body_framing, hop_by_hop_clean,
                       parse_basic_auth, parse_proxy_target)
from .udp import UdpAssociation

__all__ = ["ForwardFactory", "ForwardProtocol", "BasicAuth"]

_log = Logger()

RESPONSE_TIMEOUT = 60.0  # upstream must start answering within this
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_RESPONSE_HEAD = 64 * 1024
POOL_PER_ORIGIN = 16  # idle upstream connections kept per origin (host, port) ...
POOL_TOTAL = 256  # ... and in all
POOL_IDLE = 30.0  # seconds an idle upstream connection is kept (30 to 60 s)
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
        self.pool = UpstreamPool(reactor)

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
        self.pool.close_all()
        for proto in list(self.active):
            proto.drain()

    def stop(self) -> None:
        """The feature stops: idle upstream connections are closed."""
        self.pool.close_all()

    def count(self, kind: str, status: int) -> None:
        """One request answered (``kind``: http | socks5)."""
        self.stats.request("forward", kind, "", status)


#: States of the HTTP side of a client connection.
_H_HEAD, _H_BODY, _H_WAIT = 0, 1, 2
_CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class ForwardProtocol(Protocol):
    """One client connection of the forward proxy."""

    # slots: an idle keep-alive connection's own attributes cost 8 bytes each, no dict to outgrow
    __slots__ = ("f", "reactor", "mode", "splice", "socks", "udp", "upstream", "_deadline", "_closed", "peer",
                 "parser", "hstate", "decoder", "rechunk_up", "held", "keep", "client_eof", "pending_upgrade",
                 "no_body", "resp_started", "rechunk_down", "head_out", "client11")

    transport: Any

    def __init__(self, factory: ForwardFactory) -> None:
        self.f = factory
        self.reactor = factory.reactor
        self.mode = "detect"
        self.splice: Optional[Splice] = None
        self.socks: Optional[socks5.Socks5Server] = None
        self.udp: Optional[UdpAssociation] = None
        self.upstream: Optional[HttpUpstream] = None
        self._deadline: Optional[IDelayedCall] = None
        self._closed = False
        # HTTP: created when the first byte says HTTP
        self.parser: Optional[RequestHeadParser] = None

    def _http_init(self) -> None:
        self.parser = RequestHeadParser(max_line=MAX_HEAD, max_header_bytes=MAX_HEAD, max_headers=MAX_HEADERS)
        self.hstate = _H_HEAD
        self.decoder: Any = None  # LengthDecoder | ChunkedDecoder of the request body
        self.rechunk_up = False  # the request body goes upstream re-chunked
        self.held = b""  # client bytes after the current request (pipelined), reading paused
        self.keep = True  # the client connection outlives this exchange
        self.client_eof = False
        self.pending_upgrade = False
        self.no_body = False  # HEAD request: the response has no body
        self.resp_started = False
        self.rechunk_down = False  # the response goes to the client re-chunked
        self.head_out = b""  # a response head held back until its first body bytes

    # -- connection --------------------------------------------------------
    def connectionMade(self) -> None:
        self.f.active.add(self)
        self.peer: Any = self.transport.getPeer()
        self._arm(self.f.cfg.header_timeout)

    def _arm(self, seconds: float) -> None:
        """(Re)start the one deadline of this connection."""
        dl = self._deadline
        if dl is not None and dl.active():
            if self.reactor.seconds() + seconds >= dl.getTime():
                dl.reset(seconds)  # later: cheap (moving a call sooner searches the whole timer heap)
                return
            dl.cancel()
        self._deadline = self.reactor.callLater(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.mode == "http":
            if self.hstate == _H_HEAD and self.upstream is not None and not self.upstream.done:
                return  # a response is still streaming (the request was answered early)
            if self.hstate != _H_HEAD:
                up = self.upstream
                if up is not None and not up.got_response:
                    self.upstream = None
                    up.close()
                    self.upstream_failed(UpstreamError(504, f"no response from {up.key[0]}:{up.key[1]} in time"))
                return
            if self._partial():
                self._http_error(408, "request head not received in time")
            else:
                self._close()  # idle keep-alive connection: a quiet close
            return
        _log.debug("forward proxy: {client} timed out in {mode}", client=self.peer.host, mode=self.mode)
        self._abort()

    def _partial(self) -> bool:
        """True when part of a request head is buffered (slow client), not just idle."""
        return self.parser is not None and self.parser.partial

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
                self._http_init()
                self._http_data(data)
        # "connecting", "udp", "closing": input is ignored (the transport is paused)

    def readConnectionLost(self) -> None:
        if self.mode == "relay" and self.splice is not None:
            self.splice.read_closed(A)
        elif self.mode == "http":
            self._http_eof()
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
        self._release_upstream()

    def _release_upstream(self) -> None:
        """Done with the upstream connection: to the shared pool if it can carry another request."""
        up = self.upstream
        if up is None:
            return
        self.upstream = None
        if self.hstate == _H_BODY or not self.f.pool.put(up):
            up.close()

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
        if self.head_out:  # a head held back for its first body bytes still goes out
            self.transport.write(self.head_out)
            self.head_out = b""
        self.transport.loseConnection()
        self._disarm()
        self._deadline = self.reactor.callLater(CLOSE_GRACE, self._abort)

    def drain(self) -> None:
        """Close now if between requests; otherwise after the current response."""
        if self.mode == "detect":
            self._close()
        elif self.mode == "http" and self._between_requests() and not self._partial():
            self._close()

    def _between_requests(self) -> bool:
        return self.hstate == _H_HEAD and (self.upstream is None or self.upstream.done)

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
        st = self.hstate
        if st == _H_HEAD:
            self._http_head(data)
        elif st == _H_BODY:
            self._request_body(data)
        else:
            self._hold(data)

    def _hold(self, data: bytes) -> None:
        """Bytes after the current request (pipelined): kept, reading paused until the response ends."""
        self.held += data
        self.transport.pauseProducing()

    def _http_head(self, data: bytes) -> None:
        parser = self.parser
        assert parser is not None
        try:
            head = parser.feed(data)
        except HttpHeadError as e:
            self._http_error(e.status, f"bad request: {e.message}")
            return
        if head is not None:
            self._http_request(head, parser.take_leftover())

    def _http_eof(self) -> None:
        if self.hstate == _H_WAIT:
            # the client half-closed after its request: answer it, then close
            self.client_eof = True
            self.keep = False
            if self.upstream is None:
                self._close()
        else:
            self._close()

    def _http_error(self, status: int, message: str, extra: list[tuple[str, str]] | None = None) -> None:
        """Answer with a short plain-text error, then close (only close if a response has started)."""
        self.f.count("http", status)
        if not self.resp_started:
            body = (message.strip() + "\n").encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                       ("Connection", "close")] + (extra or [])
            self.transport.write(_raw_response(status, headers, body))
        self.mode = "closing"
        self._close()

    def _http_request(self, head: RequestHead, rest: bytes) -> None:
        if self.f.auth is not None and not self.f.auth.check_header(head.get("Proxy-Authorization")):
            _log.info("forward proxy: {client}: {m} without valid credentials", client=self.peer.host, m=head.method)
            self._http_error(407, "proxy authentication required",
                             [("Proxy-Authenticate", 'Basic realm="wmproxy"')])
            return
        try:
            target = parse_proxy_target(head)
            kind, length = body_framing(head)
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
            elif kind == "chunked" or length:
                self._http_error(400, "a CONNECT request has no body")
            else:
                self._http_connect(target.host, target.port, rest)
            return
        if "http" not in self.f.flags:
            self._http_error(405, "plain HTTP proxying is not enabled on this proxy")
            return
        upgrade = (head.get("Upgrade") or "").lower() == "websocket"
        self.pending_upgrade = upgrade
        self.client11 = head.version == "HTTP/1.1"
        self.keep = self.client11 and not _asks_close(head.get_all("Connection"))
        self.no_body = head.method == "HEAD"
        self.resp_started = False
        headers = _forwarded(head.headers, upgrade)
        if head.get("Host") is None:
            host = f"[{target.host}]" if ":" in target.host else target.host
            headers.insert(0, ("Host", host if target.port == 80 else f"{host}:{target.port}"))
        method = head.method.encode("ascii")
        raw = request_head(method, (target.path or "/").encode("ascii"), headers)
        if kind == "chunked":
            self.decoder, self.rechunk_up = ChunkedDecoder(), True
        elif length:
            self.decoder, self.rechunk_up = LengthDecoder(length), False
        else:
            self.decoder = None
        self.hstate = _H_BODY if self.decoder is not None else _H_WAIT
        key = (target.host, target.port)
        up = self.upstream
        if up is not None and (up.key != key or not up.reusable()):
            self._release_upstream()
            up = None
        # Only an idempotent request without a body may be sent again (RFC 9110 §9.2.2) when a reused
        # connection turns out closed before any answer; only such a request takes a pooled connection.
        resendable = self.decoder is None and method in IDEMPOTENT
        if up is None:
            up = self.f.pool.take(key, self) if resendable else None
            self.upstream = up = up or HttpUpstream(self, key)
        self._arm(RESPONSE_TIMEOUT)
        up.start(method, raw, retry=resendable)
        if rest and self.mode == "http":
            self._http_data(rest)

    def _request_body(self, data: bytes) -> None:
        try:
            chunks, done, rest = self.decoder.feed(data)
        except BodyError as e:
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None
            self._http_error(e.status, f"bad request body: {e.message}")
            return
        up = self.upstream
        for c in chunks:
            self.f.meter.inbound(len(c))
            if up is not None:
                up.write_seq(chunk(c)) if self.rechunk_up else up.write(c)
        if done:
            self.decoder = None
            self.hstate = _H_WAIT
            if self.rechunk_up and up is not None:
                up.write(LAST_CHUNK)
            if rest:
                self._hold(rest)

    def _http_connect(self, host: str, port: int, rest: bytes) -> None:
        def ok(proto: Protocol) -> bytes:
            self.transport.write(_CONNECT_OK)
            self.f.count("http", 200)
            return b""

        def fail(err: UpstreamError) -> None:
            self.mode = "http"
            self._http_error(err.status, err.reason)

        self._disarm()
        # bytes the client sent after the CONNECT head belong to the tunnel
        self._open_tunnel(host, port, ok, fail, rest)

    # called by HttpUpstream ------------------------------------------------------
    def upstream_retry(self, old: HttpUpstream, method: bytes, head: bytes) -> None:
        """A reused connection closed before answering: the same request on a new one."""
        up = self.upstream = HttpUpstream(self, old.key)
        up.start(method, head, retry=False)

    def upstream_failed(self, err: UpstreamError) -> None:
        if self.mode != "http":
            return
        if not self.resp_started:
            self._http_error(err.status, err.reason)
        else:
            # the response had started: never pass a truncated body off as complete
            self._close_incomplete()

    def upstream_info(self, head: ResponseHead) -> None:
        """A 1xx response: passed on (101 only when the client asked to upgrade)."""
        switching = head.status == 101 and self.pending_upgrade
        if head.status == 101 and not switching:
            up = self.upstream
            self.upstream = None
            if up is not None:
                up.close()
            self.upstream_failed(UpstreamError(502, "the upstream switched protocols unasked"))
            return
        hdrs = _forwarded(_text_fields(head.headers), switching)
        self.transport.write(_response_head(head.status, head.reason, hdrs))
        if switching:
            self.f.count("http", 101)
            self._switch_to_relay()

    def upstream_response(self, head: ResponseHead) -> None:
        self._disarm()
        self.resp_started = True
        self.f.count("http", head.status)
        fields = _text_fields(head.headers)
        hdrs = _forwarded(fields, False)
        self.rechunk_down = False
        length_body = False
        if not (self.no_body or head.status in (204, 304)):
            names = {k.lower() for k, _ in fields}
            length_body = "content-length" in names  # (never with Transfer-Encoding: the parser refuses that)
            if "transfer-encoding" in names:  # the parser decodes it; it goes out re-chunked
                self.rechunk_down = self.client11
            elif "content-length" not in names and self.client11:  # close-delimited upstream
                hdrs.append(("Transfer-Encoding", "chunked"))
                self.rechunk_down = True
            if not self.rechunk_down and "content-length" not in names:
                hdrs = [h for h in hdrs if h[0] != "Transfer-Encoding"]
                self.keep = False  # an HTTP/1.0 client reads to the close
        if not self.keep:
            hdrs.append(("Connection", "close"))
        out = _response_head(head.status, head.reason, hdrs)
        if length_body:
            # the head goes out with the first body bytes (one send, not two, when the upstream
            # sent them apart, as nginx does with sendfile)
            self.head_out = out
        else:
            self.transport.write(out)

    def upstream_data(self, data: bytes) -> None:
        self.f.meter.outbound(len(data))
        if self.rechunk_down:
            self.transport.writeSequence(chunk(data))
        elif self.head_out:
            self.transport.writeSequence((self.head_out, data))
            self.head_out = b""
        else:
            self.transport.write(data)

    def upstream_done(self) -> None:
        if self.rechunk_down:
            self.transport.write(LAST_CHUNK)
        elif self.head_out:
            self.transport.write(self.head_out)
            self.head_out = b""
        if not self.keep or self.f.draining or self.hstate != _H_WAIT:
            # (a response that ended before its request body did leaves the client stream unusable)
            self.mode = "closing"
            self._release_upstream()  # before the close: a closing client stops its producers
            self._close()
            return
        self.hstate = _H_HEAD
        self.resp_started = False
        self._arm(self.f.cfg.keepalive_timeout)
        held, self.held = self.held, b""
        if held:
            self.transport.resumeProducing()
            self._http_data(held)

    def _switch_to_relay(self) -> None:
        """A WebSocket upgrade was accepted upstream: splice the raw bytes."""
        assert self.upstream is not None
        up = self.upstream
        self.upstream = None
        self._disarm()
        splice = Splice(self.reactor, idle_timeout=self.f.cfg.idle_timeout, meter=self.f.meter)
        self.splice = splice
        self.mode = "relay"
        trailing_up = up.detach_to(splice)
        splice.attach(A, self.transport)
        if trailing_up:
            splice.received(B, trailing_up)
        held, self.held = self.held, b""
        if held:
            self.transport.resumeProducing()
            splice.received(A, held)


class UpstreamPool:
    """Idle keep-alive upstream connections, shared by the clients of one forward proxy.

    A client done with its upstream connection parks it here (at most
    ``POOL_PER_ORIGIN`` per origin, ``POOL_TOTAL`` in all); a request to the
    same origin takes the most recently parked one instead of dialling.  One
    timer for the whole pool closes those idle longer than ``POOL_IDLE``.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.idle: dict[tuple[str, int], list[HttpUpstream]] = {}
        self.count = 0
        self.closed = False
        self._sweep: Optional[IDelayedCall] = None

    def take(self, key: tuple[str, int], client: ForwardProtocol) -> Optional[HttpUpstream]:
        conns = self.idle.get(key)
        while conns:
            up = conns.pop()
            self.count -= 1
            if not conns:
                del self.idle[key]
            if up.reusable():
                up.adopt(client)
                return up
            up.close()
        return None

    def put(self, up: HttpUpstream) -> bool:
        if self.closed or self.count >= POOL_TOTAL or not up.reusable():
            return False
        conns = self.idle.setdefault(up.key, [])
        if len(conns) >= POOL_PER_ORIGIN:
            return False
        up.park(self, self.reactor.seconds())
        conns.append(up)
        self.count += 1
        if self._sweep is None:
            self._sweep = self.reactor.callLater(POOL_IDLE, self._expire)
        return True

    def discard(self, up: HttpUpstream) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)
            self.count -= 1
            if not conns:
                del self.idle[up.key]

    def _expire(self) -> None:
        self._sweep = None
        limit = self.reactor.seconds() - POOL_IDLE
        for conns in list(self.idle.values()):
            for up in [u for u in conns if u.parked_at <= limit]:
                self.discard(up)
                up.close()
        if self.count:
            self._sweep = self.reactor.callLater(POOL_IDLE, self._expire)

    def close_all(self) -> None:
        """Close every idle connection and park no more (graceful stop)."""
        self.closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle, self.idle, self.count = self.idle, {}, 0
        for conns in idle.values():
            for up in conns:
                up.close()


class HttpUpstream(Protocol):
    """One upstream HTTP/1.1 connection serving requests in turn (parked in the pool between clients)."""

    __slots__ = ("client", "key", "pool", "parked_at", "served", "got_bytes", "retry", "parser", "connected",
                 "dialling", "queue", "done", "closed", "got_response", "splice", "sent_at")

    transport: Any

    def __init__(self, client: ForwardProtocol, key: tuple[str, int]) -> None:
        self.client: Optional[ForwardProtocol] = client
        self.key = key
        self.pool: Optional[UpstreamPool] = None  # while parked
        self.parked_at = 0.0
        self.served = 0  # requests started on this connection
        self.got_bytes = False  # any byte of the current response arrived
        self.retry: Optional[tuple[bytes, bytes]] = None  # (method, head) to resend if a reused one closes
        self.parser = ResponseParser(max_head=MAX_RESPONSE_HEAD)
        self.connected = False
        self.dialling = False
        self.queue: list[bytes] = []
        self.done = True  # no exchange in progress
        self.closed = False
        self.got_response = False
        self.splice: Optional[Splice] = None
        self.sent_at = 0.0

    def reusable(self) -> bool:
        return bool(self.connected and not self.closed and self.done and self.parser.reusable
                    and not self.transport.disconnecting)

    def start(self, method: bytes, head: bytes, retry: bool = False) -> None:
        """Send one request head (its body follows through :meth:`write`).

        ``retry``: the request is idempotent and has no body, so if this connection was
        used before and closes without a byte of answer, it is resent on a new one.
        """
        assert self.client is not None
        self.done = False
        self.got_response = False
        self.got_bytes = False
        self.served += 1
        self.retry = (method, head) if retry and self.served > 1 else None
        self.sent_at = self.client.reactor.seconds()
        self.parser.expect(method)
        self.write(head)
        if not self.connected and not self.dialling:
            self.dialling = True
            host, port = self.key
            d = connect(self.client.reactor, host, port, quiet_factory(lambda: self),
                        timeout=self.client.f.cfg.connect_timeout, policy=self.client.f.policy)
            d.addErrback(self._connect_failed)

    def write(self, data: bytes) -> None:
        if self.connected:
            if not self.closed:
                self.transport.write(data)
        else:
            self.queue.append(data)

    def write_seq(self, parts: list[bytes]) -> None:
        if self.connected:
            if not self.closed:
                self.transport.writeSequence(parts)
        else:
            self.queue.extend(parts)

    def park(self, pool: UpstreamPool, now: float) -> None:
        """Between clients: no producer links, reading (to notice a close), no client."""
        client = self.client
        if client is not None:
            _unregister(client.transport, self.transport)
            _unregister(self.transport, client.transport)
        self.transport.resumeProducing()  # (the client's back-pressure may have paused it)
        self.client = None
        self.pool = pool
        self.parked_at = now

    def adopt(self, client: ForwardProtocol) -> None:
        self.pool = None
        self.client = client
        client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(client.transport, True)

    def _connect_failed(self, f: Failure) -> None:
        self.closed = True
        err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
        if self.client is not None and self.client.upstream is self:
            self.client.upstream = None
            self.client.upstream_failed(err)

    def connectionMade(self) -> None:
        if self.client is None or self.client._closed or self.closed:
            self.closed = True
            self.transport.loseConnection()
            return
        self.connected = True
        self.client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(self.client.transport, True)
        queue, self.queue = self.queue, []
        self.transport.writeSequence(queue)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.received(B, data)
            return
        if self.client is None:  # bytes nobody asked for, while parked
            self._unpark()
            self.close()
            return
        self.got_bytes = True
        try:
            events = self.parser.feed(data)
        except ResponseError as e:
            self._bad(f"bad response from upstream: {e}")
            return
        self._events(events)

    def _unpark(self) -> None:
        if self.pool is not None:
            self.pool.discard(self)
            self.pool = None

    def _bad(self, why: str) -> None:
        client = self.client
        self.close()
        if client is not None and client.upstream is self:
            client.upstream = None
            client.upstream_failed(UpstreamError(502, why))

    def _events(self, events: list[tuple[int, Any]]) -> None:
        client = self.client
        assert client is not None
        for kind, value in events:
            if client.upstream is not self:
                return  # the client gave up on this exchange
            if kind == DATA:
                client.upstream_data(value)
            elif kind == END:
                self.done = True
                client.upstream_done()
                return
            else:  # RESPONSE or INFO
                if kind == RESPONSE or value.status == 101:
                    if not self.got_response:
                        f = client.f
                        f.stats.upstream_latency("forward", "direct", "", f.reactor.seconds() - self.sent_at)
                    self.got_response = True
                if kind == RESPONSE:
                    client.upstream_response(value)
                else:
                    client.upstream_info(value)
                    if self.splice is not None:
                        return

    def detach_to(self, splice: Splice) -> bytes:
        """Hand this connection to a splice (after a 101): return unread bytes."""
        assert self.client is not None
        self.splice = splice
        _unregister(self.client.transport, self.transport)
        _unregister(self.transport, self.client.transport)
        splice.attach(B, self.transport)
        return self.parser.trailing

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self.splice is not None:
            self.splice.lost(B, reason)
            return
        client = self.client
        if client is None:  # parked: the origin closed an idle connection
            self._unpark()
            return
        _unregister(client.transport, self.transport)
        if self.done or client.upstream is not self:
            return
        if self.retry is not None and not self.got_bytes:
            # a reused connection the origin closed as the request went out: once more, on a new one
            method, head = self.retry
            client.upstream_retry(self, method, head)
            return
        try:
            events = self.parser.eof()
        except ResponseError:
            self._bad("upstream closed the connection")
            return
        self._events(events)

    def close(self) -> None:
        if self.connected and not self.closed:
            if self.client is not None:
                _unregister(self.client.transport, self.transport)
                _unregister(self.transport, self.client.transport)
            self.transport.loseConnection()
        self.closed = True


def _text_fields(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _asks_close(values: list[str]) -> bool:
    """Whether Connection field values carry the ``close`` token."""
    return any(t.strip(" \t").lower() == "close" for v in values for t in v.split(","))


def _forwarded(headers: Sequence[tuple[str, str]], upgrade: bool) -> list[tuple[str, str]]:
    """The fields to pass on: hop-by-hop ones dropped, framing re-stated, Via added.

    The input comes from our strict parsers (every name and value already checked).
    A body with a Transfer-Encoding goes on re-chunked, so the field says just ``chunked``.
    """
    out = [(k, v) for k, v in hop_by_hop_clean(headers, keep_upgrade=upgrade) if k.lower() != "transfer-encoding"]
    if len(out) != len(headers) and any(k.lower() == "transfer-encoding" for k, _ in headers):
        out.append(("Transfer-Encoding", "chunked"))
    if upgrade:
        out.append(("Connection", "Upgrade"))
    out.append(("Via", VIA))
    return out


def _response_head(status: int, reason_: bytes, headers: list[tuple[str, str]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason_ or reason(status).encode())]
    for k, v in headers:
        lines.append(f"{k}: {v}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    return b"".join(lines)


def _unregister(consumer: Any, producer: Any) -> None:
    """Unregister ``producer`` from ``consumer`` if it is the one registered."""
    if getattr(consumer, "producer", None) is producer:
        consumer.unregisterProducer()


#: SOCKS5 replies counted as the HTTP status a client of the HTTP proxy would get.
_SOCKS_STATUS = {socks5.REP_CONNECTION_NOT_ALLOWED: 403, socks5.REP_TTL_EXPIRED: 504,
                 socks5.REP_COMMAND_NOT_SUPPORTED: 501, socks5.REP_GENERAL_FAILURE: 500}


def _raw_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
