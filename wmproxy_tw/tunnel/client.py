"""The private tunnel client (SPEC §8) and forward-proxy chaining (SPEC §3).

:class:`TunnelClient` is a service that keeps one tunnel connection to ``[proxy] server`` (TLS
with ``ts``, verified by ``domain``/``ca``; mutual TLS with ``two_way_tls``; no fallback to
cleartext), authenticates, registers ``[[proxy.mappings]]`` and serves the streams the server
opens: ``tcp``/``http``/``https`` mappings are relayed to ``local_addr`` with
:class:`~wmproxy_tw.relay.Splice`, ``proxy`` mappings are handed to this node's forward-proxy
engine.  It reconnects with jittered exponential backoff (1 s → 30 s) and registers again.

With ``bind`` set too, the node chains: each connection accepted on ``bind`` is relayed over a
client-opened ``@proxy`` stream to the server, whose forward proxy (with its auth) serves it
(:meth:`TunnelClient.chain_factory`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config.model import Mapping, Proxy
from ..connect import UpstreamError, connect, endpoint_for, quiet_factory
from ..relay import A, B, Splice, SpliceProtocol
from .connection import StreamSpliceFactory, TunnelConnection, TunnelStream
from .frames import ResetCode
from .session import (
    AuthRejected,
    Event,
    HelloAccepted,
    RegistrationAccepted,
    RegistrationRefused,
)

__all__ = ["Backoff", "ClientConnection", "TunnelClient", "mapping_domains"]

_log = Logger()


class Backoff:
    """Jittered exponential delays: ``first`` doubling up to ``cap``, each scaled by 0.5–1."""

    def __init__(self, first: float = 1.0, cap: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self.rng = rng
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt (and count it)."""
        base = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return max(self.first, base * (0.5 + 0.5 * self.rng()))

    def reset(self) -> None:
        self.attempt = 0


def mapping_domains(mapping: Mapping) -> tuple[str, ...]:
    """The domains of a mapping (``domain`` may list several, by spaces or commas)."""
    return tuple(d for d in re.split(r"[\s,]+", mapping.domain or "") if d)


class ClientConnection(TunnelConnection):
    """The client end of the tunnel."""

    def __init__(self, client: TunnelClient) -> None:
        cfg = client.cfg
        super().__init__(client.reactor, True, heartbeat_interval=cfg.heartbeat_interval,
                         heartbeat_timeout=cfg.heartbeat_timeout)
        self.client = client
        self.refused: dict[str, str] = {}
        self.accepted: set[str] = set()

    def tunnel_made(self) -> None:
        cfg = self.client.cfg
        if cfg.token is not None:
            frames = self.mux.hello(client=cfg.client_name or "", token=cfg.token)
        else:
            frames = self.mux.hello(client=cfg.client_name or "", username=cfg.username,
                                    password=cfg.password)
        self._send(frames)

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloAccepted):
            self.start_heartbeat(min(self.heartbeat_interval, event.heartbeat_ms / 1000))
            self.client.session_open(self)
            for mapping in self.client.cfg.mappings:
                rules = mapping.model_dump(mode="json", include={"headers"})["headers"]
                self._send(self.mux.register(mapping.name, mapping.mode, mapping_domains(mapping),
                                             mapping.remote_port, tuple(rules)))
        elif isinstance(event, AuthRejected):
            _log.error("tunnel server {server} refused our credentials: {reason}",
                       server=self.client.target, reason=event.reason)
            self.client.auth_failed = event.reason
            self._close()
        elif isinstance(event, RegistrationAccepted):
            self.accepted.add(event.name)
            _log.info("tunnel: mapping {name} is published by {server}", name=event.name,
                      server=self.client.target)
        elif isinstance(event, RegistrationRefused):
            self.refused[event.name] = event.reason
            _log.warn("tunnel: mapping {name} refused by {server}: {reason}", name=event.name,
                      server=self.client.target, reason=event.reason)

    def stream_opened(self, stream: TunnelStream) -> None:
        mapping = self.client.mappings.get(stream.mapping)
        if mapping is None:
            stream.reset(ResetCode.UNKNOWN_MAPPING)
        elif mapping.mode == "proxy":
            self.client.serve_proxy(stream)
        else:
            self.client.relay_local(stream, mapping)

    def tunnel_lost(self, reason: Failure) -> None:
        self.client.connection_lost(self, reason)


class TunnelClient(service.Service):
    """Keeps the tunnel to the server up; serves its streams; opens chained ones."""

    def __init__(self, reactor: Any, cfg: Proxy, forward: Any = None,
                 rng: Callable[[], float] = random.random) -> None:
        assert cfg.server is not None
        self.reactor = reactor
        self.cfg = cfg
        self.target = str(cfg.server)
        self.mappings = {m.name: m for m in cfg.mappings}
        self.forward = forward  # ForwardFactory for proxy-mode mappings (None: none configured)
        self.tls: Any = None
        self.backoff = Backoff(rng=rng)
        self.conn: ClientConnection | None = None  # open session, if any
        self.auth_failed: str | None = None
        self.sessions = 0  # sessions opened so far (for status and tests)
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._current: ClientConnection | None = None
        self._waiters: list[Deferred[ClientConnection]] = []

    def use_tls(self, creator: Any) -> None:
        """Speak TLS to the server with this client connection creator (never cleartext)."""
        self.tls = creator

    # --- service ---

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> Any:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self._current is not None:
            self._current.go_away("client stopping")
        return None

    # --- connecting ---

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        server = self.cfg.server
        assert server is not None
        endpoint = endpoint_for(self.reactor, server.host, server.port, self.cfg.connect_timeout)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint)
        factory = Factory.forProtocol(lambda: ClientConnection(self))  # type: ignore[arg-type]
        factory.noisy = False
        d = endpoint.connect(factory)
        self._attempt = d

        def connected(proto: ClientConnection) -> None:
            self._attempt = None
            self._current = proto

        def failed(failure: Failure) -> None:
            self._attempt = None
            if not self.running:
                return
            delay = self.backoff.next()
            _log.info("tunnel: cannot reach the server {server}: {why}; retrying in {delay:.1f}s",
                      server=self.target, why=failure.getErrorMessage(), delay=delay)
            self._retry = self.reactor.callLater(delay, self._connect)

        d.addCallbacks(connected, failed)

    def session_open(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.auth_failed = None
        self.sessions += 1
        self.backoff.reset()
        _log.info("tunnel: connected to {server}", server=self.target)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(conn)

    def connection_lost(self, conn: ClientConnection, reason: Failure) -> None:
        was_open = self.conn is conn
        if self.conn is conn:
            self.conn = None
        if self._current is conn:
            self._current = None
        if not self.running:
            return
        delay = self.backoff.next()
        if was_open:
            _log.warn("tunnel: connection to {server} lost ({why}); reconnecting in {delay:.1f}s",
                      server=self.target, why=reason.getErrorMessage(), delay=delay)
        else:
            _log.info("tunnel: no session with {server} ({why}); retrying in {delay:.1f}s",
                      server=self.target, why=self.auth_failed or reason.getErrorMessage(),
                      delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect)

    def when_connected(self) -> Deferred[ClientConnection]:
        """Fires with the open session (now, or when the next one opens)."""
        if self.conn is not None:
            d: Deferred[ClientConnection] = Deferred()
            d.callback(self.conn)
            return d
        d = Deferred()
        self._waiters.append(d)
        return d

    # --- streams from the server ---

    def serve_proxy(self, stream: TunnelStream) -> None:
        """A public connection of a proxy-mode mapping: this node's forward proxy serves it."""
        if self.forward is None:
            stream.reset(ResetCode.UNKNOWN_MAPPING)
            return
        proto = self.forward.buildProtocol(stream.getPeer())
        if proto is None:
            stream.reset(ResetCode.REFUSED)
            return
        stream.attach(proto)

    def relay_local(self, stream: TunnelStream, mapping: Mapping) -> None:
        """Connect to the mapping's ``local_addr`` and relay the stream to it."""
        assert mapping.local_addr is not None
        local = mapping.local_addr
        stream.pauseProducing()  # hold its bytes (within the window) until connected
        splice = Splice(self.reactor, idle_timeout=self.cfg.idle_timeout)
        d = connect(self.reactor, local.host, local.port,
                    quiet_factory(lambda: SpliceProtocol(splice, B)),
                    timeout=self.cfg.connect_timeout)

        def ok(proto: Protocol) -> None:
            if not stream.connected:
                if proto.transport is not None:
                    proto.transport.loseConnection()
                return
            stream.attach(SpliceProtocol(splice, A))
            stream.resumeProducing()

        def fail(failure: Failure) -> None:
            err = failure.value
            status = err.status if isinstance(err, UpstreamError) else 502
            _log.info("tunnel: mapping {name}: {why}", name=mapping.name,
                      why=failure.getErrorMessage())
            stream.reset(ResetCode.CONNECT_TIMEOUT if status == 504 else ResetCode.CONNECT_FAILED)

        d.addCallbacks(ok, fail)

    # --- chaining ---

    def open_chain(self, peer: Any) -> TunnelStream | None:
        """A ``@proxy`` stream to the parent for a client of our forward-proxy bind."""
        conn = self.conn
        if conn is None or not conn.mux.is_open:
            _log.info("tunnel: no session with {server}: chained connection closed",
                      server=self.target)
            return None
        return conn.open_stream("@proxy", peer)

    def chain_factory(self) -> Factory:
        """The factory for ``bind``: every accepted connection goes to the parent's proxy."""
        return StreamSpliceFactory(self.reactor, self.open_chain, self.cfg.idle_timeout,
                                   f"proxy chained to {self.target}")
