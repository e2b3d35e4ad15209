"""The public tunnel server (SPEC §8): authenticates clients and publishes their mappings.

:class:`TunnelServer` is the feature: it listens on ``center_addr`` (TLS with ``tc``, mutual
TLS with ``two_way_tls``), keeps the :class:`MappingRegistry` of what each connected client
serves, and answers the public listeners (``map_http_bind``, ``map_https_bind``,
``map_tcp_bind``, ``map_proxy_bind`` and per-mapping ``remote_port``) by opening streams to the
client that owns the route (see :mod:`.public`).  Chained forward-proxy streams (``@proxy``)
from clients are served by this node's forward-proxy engine, with its own auth.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config.grammar import Address, HeaderRule, parse_header_rule
from ..config.model import Proxy
from ..listen import Listener, ListenerRegistry, StartupError
from .connection import StreamSpliceFactory, TunnelConnection, TunnelStream
from .frames import Hello, Register, ResetCode
from .session import Event, HelloReceived, RegisterReceived

__all__ = ["Credentials", "MappingRegistry", "Route", "ServerConnection", "TunnelServer",
           "normalize_host"]

_log = Logger()

MIN_REMOTE_PORT = 1024
"""Clients may not ask the server to open privileged ports."""
MAX_OFFLINE = 4096
"""How many domains of departed clients are remembered (to answer 502 rather than 404)."""


class Credentials:
    """The server's accepted credentials: ``username``/``password`` and/or ``tokens``."""

    def __init__(self, username: str | None, password: str | None, tokens: tuple[str, ...]):
        self._user = username.encode() if username is not None else None
        self._pass = password.encode() if password is not None else None
        self._tokens = [t.encode() for t in tokens]

    @property
    def required(self) -> bool:
        """Whether anonymous clients are refused."""
        return self._user is not None or bool(self._tokens)

    def check(self, hello: Hello) -> str | None:
        """The client's identity (for logs and takeover) if its credentials are good, else None."""
        if not self.required:
            return "anonymous"
        if hello.token is not None:
            given = hello.token.encode("utf-8", "surrogatepass")
            good = None
            for index, token in enumerate(self._tokens):  # compare all: no early exit
                if hmac.compare_digest(given, token) and good is None:
                    good = index
            return f"token #{good + 1}" if good is not None else None
        if hello.username is not None and hello.password is not None and self._user is not None:
            assert self._pass is not None
            ok_user = hmac.compare_digest(hello.username.encode("utf-8", "surrogatepass"), self._user)
            ok_pass = hmac.compare_digest(hello.password.encode("utf-8", "surrogatepass"), self._pass)
            return f"user {hello.username}" if ok_user and ok_pass else None
        return None


def normalize_host(host: str) -> str:
    """A Host header value as a routing key: lower case, no port, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


@dataclass(eq=False)
class Route:
    """One published mapping: which connection serves it and how."""

    conn: ServerConnection
    name: str
    mode: str
    domains: tuple[str, ...] = ()
    remote_port: int | None = None
    rules: tuple[HeaderRule, ...] = ()
    listener: Listener | None = field(default=None, repr=False)

    @property
    def owner(self) -> str:
        return f"client {self.conn.client_label!r} (mapping {self.name!r})"

    def open(self, peer: Any) -> TunnelStream | None:
        """A new stream to the client for a public connection from ``peer`` (None if gone)."""
        if not self.conn.mux.is_open or self.listener is None and self.remote_port is not None:
            return None
        return self.conn.open_stream(self.name, peer)


class MappingRegistry:
    """Who serves what: domains per mode (exact and ``*.`` wildcard), defaults, remote ports."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Route]] = {"http": {}, "https": {}}
        self.wild: dict[str, dict[str, Route]] = {"http": {}, "https": {}}
        self.default: dict[str, Route] = {}  # "tcp" / "proxy": served on map_tcp/proxy_bind
        self.ports: dict[int, Route] = {}
        self.offline: OrderedDict[tuple[str, str], str] = OrderedDict()

    def routes(self) -> list[Route]:
        """Every published route, once."""
        seen: dict[int, Route] = {}
        tables: list[Mapping[Any, Route]] = [*self.exact.values(), *self.wild.values(), self.default, self.ports]
        for table in tables:
            for route in table.values():
                seen[id(route)] = route
        return list(seen.values())

    @staticmethod
    def _key(domain: str) -> tuple[bool, str]:
        domain = domain.lower().rstrip(".")
        if domain.startswith("*."):
            return True, domain[2:]
        return False, domain

    def holder(self, mode: str, domain: str) -> Route | None:
        """The route holding exactly this domain (or wildcard) for the mode."""
        wildcard, key = self._key(domain)
        table = self.wild[mode] if wildcard else self.exact[mode]
        return table.get(key)

    def add(self, route: Route) -> None:
        for domain in route.domains:
            wildcard, key = self._key(domain)
            (self.wild if wildcard else self.exact)[route.mode][key] = route
            self.offline.pop((route.mode, domain.lower()), None)
        if route.remote_port is not None:
            self.ports[route.remote_port] = route
        elif route.mode in ("tcp", "proxy"):
            self.default[route.mode] = route

    def remove(self, route: Route) -> None:
        for domain in route.domains:
            wildcard, key = self._key(domain)
            table = (self.wild if wildcard else self.exact)[route.mode]
            if table.get(key) is route:
                del table[key]
                self.offline[(route.mode, domain.lower())] = route.conn.client_label
                while len(self.offline) > MAX_OFFLINE:
                    self.offline.popitem(last=False)
        if route.remote_port is not None and self.ports.get(route.remote_port) is route:
            del self.ports[route.remote_port]
        if self.default.get(route.mode) is route:
            del self.default[route.mode]

    def _candidates(self, host: str) -> list[tuple[bool, str]]:
        out = [(False, host)]
        labels = host.split(".")
        out += [(True, ".".join(labels[i:])) for i in range(1, len(labels))]
        return out

    def find(self, mode: str, host: str) -> Route | None:
        """The route for a request's host: exact first, then the longest ``*.`` suffix."""
        host = normalize_host(host)
        for wildcard, key in self._candidates(host):
            route = (self.wild if wildcard else self.exact)[mode].get(key)
            if route is not None:
                return route
        return None

    def offline_owner(self, mode: str, host: str) -> str | None:
        """The client that served this host before it went away, if remembered."""
        host = normalize_host(host)
        for wildcard, key in self._candidates(host):
            owner = self.offline.get((mode, f"*.{key}" if wildcard else key))
            if owner is not None:
                return owner
        return None


class ServerConnection(TunnelConnection):
    """The server end of one client's tunnel connection."""

    def __init__(self, server: TunnelServer) -> None:
        cfg = server.cfg
        super().__init__(server.reactor, False, heartbeat_interval=cfg.heartbeat_interval,
                         heartbeat_timeout=cfg.heartbeat_timeout)
        self.server = server
        self.client_name = ""
        self.identity: str | None = None
        self.routes: list[Route] = []

    @property
    def client_label(self) -> str:
        return self.client_name or self.label

    def tunnel_made(self) -> None:
        self.server.connections.add(self)

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived):
            self._hello(event.hello)
        elif isinstance(event, RegisterReceived):
            reason = self.server.register(self, event.register)
            if reason is None:
                self._send(self.mux.accept_registration(event.register.name))
                _log.info("tunnel client {client}: mapping {name} ({mode}) published",
                          client=self.client_label, name=event.register.name,
                          mode=event.register.mode)
            else:
                self._send(self.mux.refuse_registration(event.register.name, reason))
                _log.warn("tunnel client {client}: mapping {name} refused: {reason}",
                          client=self.client_label, name=event.register.name, reason=reason)

    def _hello(self, hello: Hello) -> None:
        self.client_name = hello.client
        identity = self.server.credentials.check(hello)
        if identity is None:
            kind = "token" if hello.token is not None else (
                "username/password" if hello.username is not None else "no credentials")
            _log.warn("tunnel client {client} from {peer}: authentication failed ({kind})",
                      client=hello.client or "-", peer=self.label, kind=kind)
            self._send(self.mux.reject_hello("invalid credentials"))
            self._close()
            return
        self.identity = identity
        self.server.replace_stale(self)
        self._send(self.mux.accept_hello(int(self.server.cfg.heartbeat_interval * 1000)))
        self.start_heartbeat()
        _log.info("tunnel client {client} connected from {peer} ({identity})",
                  client=hello.client or "-", peer=self.label, identity=identity)

    def stream_opened(self, stream: TunnelStream) -> None:
        if stream.mapping != "@proxy":
            _log.info("tunnel client {client}: stream for unknown service {name}",
                      client=self.client_label, name=stream.mapping)
            stream.reset(ResetCode.UNKNOWN_MAPPING)
            return
        proto = self.server.forward.buildProtocol(stream.getPeer())
        if proto is None:
            stream.reset(ResetCode.REFUSED)
            return
        stream.attach(proto)

    def heartbeat_expired(self) -> None:
        self.server.unregister_all(self)

    def tunnel_lost(self, reason: Failure) -> None:
        self.server.connections.discard(self)
        if self.identity is not None:
            _log.info("tunnel client {client} disconnected: {why}", client=self.client_label,
                      why=reason.getErrorMessage())
        self.server.unregister_all(self)


class TunnelServer:
    """The tunnel server feature of one configuration."""

    def __init__(self, reactor: Any, cfg: Proxy, listeners: ListenerRegistry,
                 forward: Any) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.listeners = listeners
        self.forward = forward  # ForwardFactory serving @proxy streams
        self.credentials = Credentials(cfg.username, cfg.password, cfg.tokens)
        self.registry = MappingRegistry()
        self.connections: set[ServerConnection] = set()
        self.public_modes: set[str] = set()  # modes with a listener: http, https, tcp, proxy
        self.fleet: Any = None  # FleetTunnels (tunnel/fleet.py) when [fleet] is configured
        hosts = cfg.map_tcp_bind or cfg.center_addr or ()
        self.port_host = hosts[0].host if hosts else "127.0.0.1"

    def factory(self) -> Factory[ServerConnection]:
        """The protocol factory for ``center_addr`` (wrap it in TLS as configured)."""
        factory = Factory.forProtocol(lambda: ServerConnection(self))
        factory.noisy = False
        return factory

    # --- registrations ---

    def replace_stale(self, conn: ServerConnection) -> None:
        """A named client reconnected while its old session lingers unanswered: drop the old one.

        Only a session that has not answered our last ping (silent for 1.5 heartbeat intervals)
        is replaced, so two live clients of one name do not take turns: the second one's
        conflicting registrations are refused instead.
        """
        if not conn.client_name:
            return
        now = self.reactor.seconds()
        for other in list(self.connections):
            if (other is conn or other.client_name != conn.client_name
                    or other.identity != conn.identity or not other.mux.is_open):
                continue
            heartbeat = other.heartbeat
            if heartbeat is not None and now - heartbeat.last_received < 1.5 * heartbeat.interval:
                continue
            _log.info("tunnel client {client}: a new connection replaces the silent one from {peer}",
                      client=conn.client_name, peer=other.label)
            self.unregister_all(other)
            other.go_away("replaced by a new connection of the same client")

    def register(self, conn: ServerConnection, reg: Register) -> str | None:
        """Publish a mapping; returns the reason for refusing it, or None."""
        reason = self._refusal(conn, reg)
        if reason is not None:
            return reason
        route = Route(conn, reg.name, reg.mode, tuple(d.lower() for d in reg.domains),
                      reg.remote_port)
        if reg.mode in ("http", "https"):
            rules = []
            for text in reg.headers:
                try:
                    rules.append(parse_header_rule(text))
                except ValueError as exc:
                    return f"bad header rule: {exc}"
            route.rules = tuple(rules)
        if reg.remote_port is not None:
            addr = Address(self.port_host, reg.remote_port)
            factory = StreamSpliceFactory(self.reactor, route.open,
                                          self.cfg.idle_timeout, f"tunnel port {reg.remote_port}")
            try:
                route.listener = self.listeners.bind_tcp(
                    addr, factory, f"tunnel port for {route.owner}", self.cfg.max_connections)
            except StartupError as exc:
                return f"remote_port {reg.remote_port} cannot be opened: {exc}"
        self.registry.add(route)
        conn.routes.append(route)
        if self.fleet is not None:
            self.fleet.route_added(route)
        return None

    def _refusal(self, conn: ServerConnection, reg: Register) -> str | None:
        mode = reg.mode
        if reg.remote_port is not None:
            if mode not in ("tcp", "proxy"):
                return "remote_port is for tcp and proxy mappings"
            if reg.remote_port < MIN_REMOTE_PORT:
                return f"remote_port {reg.remote_port} is privileged (below {MIN_REMOTE_PORT})"
            holder = self.registry.ports.get(reg.remote_port)
            if holder is not None:
                return f"port {reg.remote_port} is taken by {_whose(holder, conn)}"
            return None
        if mode not in self.public_modes:
            bind = {"tcp": "map_tcp_bind (or give the mapping a remote_port)"}.get(
                mode, f"map_{mode}_bind")
            return f"this server has no {bind}"
        if mode in ("tcp", "proxy"):
            holder = self.registry.default.get(mode)
            if holder is not None:
                return f"map_{mode}_bind is already served by {_whose(holder, conn)}"
            return None
        if not reg.domains:
            return f"a {mode} mapping needs a domain"
        for domain in reg.domains:
            holder = self.registry.holder(mode, domain)
            if holder is not None:
                return f"domain {domain!r} is already served by {_whose(holder, conn)}"
        if len({d.lower() for d in reg.domains}) != len(reg.domains):
            return "the mapping names a domain twice"
        return None

    def unregister_all(self, conn: ServerConnection) -> None:
        """Free every registration of a connection (it is gone or replaced)."""
        routes, conn.routes = conn.routes, []
        for route in routes:
            self.registry.remove(route)
            if self.fleet is not None:
                self.fleet.route_removed(route)
            if route.listener is not None:
                listener, route.listener = route.listener, None
                self.listeners.close("tcp", listener.addr)
        if routes:
            _log.info("tunnel client {client}: {n} mapping(s) withdrawn",
                      client=conn.client_label, n=len(routes))

    def open_default(self, mode: str, peer: Any) -> TunnelStream | None:
        """A stream for a connection on ``map_tcp_bind`` / ``map_proxy_bind`` (None: offline)."""
        route = self.registry.default.get(mode)
        return route.open(peer) if route is not None else None

    def open_public(self, mode: str, peer: Any) -> Any:
        """``map_tcp_bind`` / ``map_proxy_bind``: the local client, else (fleet) a node holding one."""
        if self.fleet is not None:
            return self.fleet.open_default(mode, peer)
        return self.open_default(mode, peer)

    def stop(self) -> None:
        """Tell every client we are going away."""
        for conn in list(self.connections):
            self.unregister_all(conn)
            conn.go_away("server shutting down")


def _whose(route: Route, asking: ServerConnection) -> str:
    if route.conn is asking:
        return f"your mapping {route.name!r}"
    return route.owner
