"""The private tunnel client (SPEC §8) and forward-proxy chaining (SPEC §3).

:class:`TunnelClient` is a service that keeps tunnel connections to ``[proxy] server`` (TLS
with ``ts``, verified by ``domain``/``ca``; mutual TLS with ``two_way_tls``; no fallback to
cleartext), authenticates, registers ``[[proxy.mappings]]`` and serves the streams the server
opens: ``tcp``/``http``/``https`` mappings are relayed to ``local_addr`` with
:class:`~wmproxy_tw.relay.Splice`, ``proxy`` mappings are handed to this node's forward-proxy
engine.  ``server`` may list several servers (a fleet, docs/tunnel-protocol.md §9): the client
stays attached to ``attach`` of them (default ``min(2, listed)``), each :class:`Attachment`
authenticating and registering every mapping on its own server.  Each attachment reconnects with
jittered exponential backoff (1 s → 30 s), moving on to another listed server that no other
attachment holds, and registers again.

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

from ..config.grammar import Address
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

__all__ = ["Attachment", "Backoff", "ClientConnection", "TunnelClient", "mapping_domains"]

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
    """The client end of the tunnel (one per attachment)."""

    def __init__(self, client: TunnelClient, attachment: Attachment | None = None) -> None:
        cfg = client.cfg
        super().__init__(client.reactor, True, heartbeat_interval=cfg.heartbeat_interval,
                         heartbeat_timeout=cfg.heartbeat_timeout)
        self.client = client
        self.attachment = attachment if attachment is not None else client.attachments[0]
        self.refused: dict[str, str] = {}
        self.accepted: set[str] = set()

    @property
    def target(self) -> str:
        return self.attachment.target_text

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
            self.attachment.session_open(self)
            for mapping in self.client.cfg.mappings:
                rules = mapping.model_dump(mode="json", include={"headers"})["headers"]
                self._send(self.mux.register(mapping.name, mapping.mode, mapping_domains(mapping),
                                             mapping.remote_port, tuple(rules)))
        elif isinstance(event, AuthRejected):
            _log.error("tunnel server {server} refused our credentials: {reason}",
                       server=self.target, reason=event.reason)
            self.attachment.auth_failed = event.reason
            self._close()
        elif isinstance(event, RegistrationAccepted):
            self.accepted.add(event.name)
            _log.info("tunnel: mapping {name} is published by {server}", name=event.name,
                      server=self.target)
        elif isinstance(event, RegistrationRefused):
            self.refused[event.name] = event.reason
            _log.warn("tunnel: mapping {name} refused by {server}: {reason}", name=event.name,
                      server=self.target, reason=event.reason)

    def stream_opened(self, stream: TunnelStream) -> None:
        mapping = self.client.mappings.get(stream.mapping)
        if mapping is None:
            stream.reset(ResetCode.UNKNOWN_MAPPING)
        elif mapping.mode == "proxy":
            self.client.serve_proxy(stream)
        else:
            self.client.relay_local(stream, mapping)

    def tunnel_lost(self, reason: Failure) -> None:
        self.attachment.connection_lost(self, reason)


class Attachment:
    """One attachment of the client: a tunnel to one of the listed servers, with its own backoff.

    When its connection fails or is lost it moves on to the next listed server that no other
    attachment holds (or tries the same one again when there is none), after the backoff delay.
    """

    def __init__(self, client: TunnelClient, index: int, rng: Callable[[], float]) -> None:
        self.client = client
        self.index = index
        self.target: Address = client.servers[index]
        self.backoff = Backoff(rng=rng)
        self.conn: ClientConnection | None = None  # open session, if any
        self.auth_failed: str | None = None
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._current: ClientConnection | None = None

    @property
    def target_text(self) -> str:
        return str(self.target)

    def start(self) -> None:
        self._connect()

    def stop(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self._current is not None:
            self._current.go_away("client stopping")

    def _move_on(self) -> None:
        """After a failure: the next listed server no other attachment holds (if any)."""
        servers = self.client.servers
        held = {a.target for a in self.client.attachments if a is not self}
        start = servers.index(self.target) if self.target in servers else -1
        for step in range(1, len(servers) + 1):
            candidate = servers[(start + step) % len(servers)]
            if candidate not in held:
                if candidate != self.target:
                    _log.info("tunnel: attachment {n} moves from {old} to {new}",
                              n=self.index + 1, old=self.target_text, new=str(candidate))
                self.target = candidate
                return

    def _schedule(self) -> float:
        delay = self.backoff.next()
        self._move_on()
        self._retry = self.client.reactor.callLater(delay, self._connect)
        return delay

    def _connect(self) -> None:
        self._retry = None
        client = self.client
        if not client.running:
            return
        server = self.target
        endpoint = endpoint_for(client.reactor, server.host, server.port, client.cfg.connect_timeout)
        tls = client.tls_for(server)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        factory = Factory.forProtocol(lambda: ClientConnection(client, self))  # type: ignore[arg-type]
        factory.noisy = False
        d = endpoint.connect(factory)
        self._attempt = d

        def connected(proto: ClientConnection) -> None:
            self._attempt = None
            self._current = proto

        def failed(failure: Failure) -> None:
            self._attempt = None
            if not client.running:
                return
            target = self.target_text
            delay = self._schedule()
            _log.info("tunnel: cannot reach the server {server}: {why}; retrying in {delay:.1f}s",
                      server=target, why=failure.getErrorMessage(), delay=delay)

        d.addCallbacks(connected, failed)

    def session_open(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.auth_failed = None
        self.backoff.reset()
        _log.info("tunnel: connected to {server}", server=self.target_text)
        self.client.session_open(conn)

    def connection_lost(self, conn: ClientConnection, reason: Failure) -> None:
        was_open = self.conn is conn
        if self.conn is conn:
            self.conn = None
        if self._current is conn:
            self._current = None
        if not self.client.running:
            return
        target = self.target_text
        delay = self._schedule()
        if was_open:
            _log.warn("tunnel: connection to {server} lost ({why}); reconnecting in {delay:.1f}s",
                      server=target, why=reason.getErrorMessage(), delay=delay)
        else:
            _log.info("tunnel: no session with {server} ({why}); retrying in {delay:.1f}s",
                      server=target, why=self.auth_failed or reason.getErrorMessage(),
                      delay=delay)


class TunnelClient(service.Service):
    """Keeps tunnels to ``attach`` of the listed servers up; serves their streams; chains."""

    def __init__(self, reactor: Any, cfg: Proxy, forward: Any = None,
                 rng: Callable[[], float] = random.random) -> None:
        assert cfg.server
        self.reactor = reactor
        self.cfg = cfg
        self.servers: tuple[Address, ...] = cfg.server
        self.target = " ".join(str(s) for s in cfg.server)
        self.mappings = {m.name: m for m in cfg.mappings}
        self.forward = forward  # ForwardFactory for proxy-mode mappings (None: none configured)
        self.tls: Callable[[Address], Any] | None = None
        self.attachments: list[Attachment] = []
        self.attachments = [Attachment(self, i, rng) for i in range(cfg.attach_count)]
        self.sessions = 0  # sessions opened so far (for status and tests)
        self._waiters: list[Deferred[ClientConnection]] = []

    def use_tls(self, creator: Any) -> None:
        """Speak TLS to every server (never cleartext) with this client connection creator."""
        self.tls = lambda _server: creator

    def use_tls_for(self, make: Callable[[Address], Any]) -> None:
        """Speak TLS to each server with the creator ``make(server)`` returns (verified by name)."""
        self.tls = make

    def tls_for(self, server: Address) -> Any:
        return self.tls(server) if self.tls is not None else None

    @property
    def conn(self) -> ClientConnection | None:
        """An open session (the first attachment's when several are open), or None."""
        for attachment in self.attachments:
            if attachment.conn is not None:
                return attachment.conn
        return None

    @property
    def backoff(self) -> Backoff:
        return self.attachments[0].backoff

    @property
    def auth_failed(self) -> str | None:
        return next((a.auth_failed for a in self.attachments if a.auth_failed), None)

    # --- service ---

    def startService(self) -> None:
        super().startService()
        for attachment in self.attachments:
            attachment.start()

    def stopService(self) -> Any:
        super().stopService()
        for attachment in self.attachments:
            attachment.stop()
        return None

    def session_open(self, conn: ClientConnection) -> None:
        self.sessions += 1
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(conn)

    def when_connected(self) -> Deferred[ClientConnection]:
        """Fires with an open session (now, or when the next one opens)."""
        conn = self.conn
        if conn is not None:
            d: Deferred[ClientConnection] = Deferred()
            d.callback(conn)
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
