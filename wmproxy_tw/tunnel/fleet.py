"""Fleet tunnels: a public request on node A for a tunnel client attached to node B goes A → B.

Each fleet node with a tunnel server listens on its ``[fleet] advertise`` address for the other
nodes (:class:`LinkServerConnection`).  The inter-node link *is* the tunnel protocol
(docs/tunnel-protocol.md §9): node A connects as a client, authenticates with the fleet
``secret`` (compared in constant time), registers nothing, and opens one stream per public
connection it carries, naming a fleet service instead of a mapping:

* ``@fleet-http`` / ``@fleet-https``: the stream carries HTTP/1.1 requests exactly as node A
  received them (TLS already terminated); node B serves it with its own
  :class:`~wmproxy_tw.tunnel.httpmap.PublicHttp`, which routes by Host to its local client,
  applies the mapping's header rules and answers 404/502 itself;
* ``@fleet-tcp`` / ``@fleet-proxy``: the stream is relayed (:class:`~wmproxy_tw.relay.Splice`)
  to a new stream of the client holding ``map_tcp_bind`` / ``map_proxy_bind`` on node B.

The ``OPEN`` frame's ``peer`` carries the public client's address, so node B's header rules and
logs see the real client.  Streams that arrive over a link are never carried on to a third node.
:class:`LinkPool` keeps one link per peer node and reuses it for every stream.

:class:`FleetTunnels` is the glue a :class:`~wmproxy_tw.tunnel.server.TunnelServer` calls: it
claims and releases its clients' domains/ports in the :class:`~.directory.ITunnelDirectory`,
renews them, and finds a live holder node for a request no local client serves.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config.grammar import parse_address
from ..fleet.redis import RedisUnavailable
from ..connect import endpoint_for
from ..relay import A, B, Splice, SpliceProtocol
from .connection import TunnelConnection, TunnelStream
from .directory import Claim, ITunnelDirectory, lookup_keys
from .frames import ResetCode
from .session import (
    AuthRejected,
    Event,
    HelloAccepted,
    HelloReceived,
    RegisterReceived,
    TunnelStateError,
)

if TYPE_CHECKING:
    from .server import Route, TunnelServer

__all__ = ["FleetTunnels", "LinkConnection", "LinkPool", "LinkServerConnection", "RemoteRoute",
           "SERVICES", "route_keys"]

_log = Logger()

SERVICES = {"http": "@fleet-http", "https": "@fleet-https", "tcp": "@fleet-tcp",
            "proxy": "@fleet-proxy"}
"""The stream service names of the inter-node link, per public mode."""
_MODES = {name: mode for mode, name in SERVICES.items()}
LOOKUP_CACHE_TTL = 1.0
"""Seconds a node reuses a directory answer (a holder found) before asking Redis again."""
LOOKUP_CACHE_SIZE = 4096


def route_keys(route: Route) -> list[str]:
    """The directory keys a published route claims (none for a per-mapping ``remote_port``)."""
    if route.mode in ("http", "https"):
        return list(route.domains)
    if route.remote_port is None:
        return [""]
    return []


def _no_delay(transport: Any) -> None:
    """Small request/response frames leave at once on a link (no Nagle wait for an ACK)."""
    set_no_delay = getattr(getattr(transport, "transport", transport), "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class LinkServerConnection(TunnelConnection):
    """Node B's end of a link from another node: serves its ``@fleet-*`` streams."""

    def __init__(self, fleet: FleetTunnels) -> None:
        cfg = fleet.server.cfg
        super().__init__(fleet.server.reactor, False, heartbeat_interval=cfg.heartbeat_interval,
                         heartbeat_timeout=cfg.heartbeat_timeout)
        self.fleet = fleet
        self.peer_node = ""

    def tunnel_made(self) -> None:
        self.fleet.incoming.add(self)
        _no_delay(self.transport)

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived):
            self.peer_node = event.hello.client
            given = (event.hello.token or "").encode("utf-8", "surrogatepass")
            if not hmac.compare_digest(given, self.fleet.secret):
                _log.warn("fleet link from {peer} ({node}): bad fleet secret", peer=self.label,
                          node=self.peer_node or "-")
                self._send(self.mux.reject_hello("invalid fleet secret"))
                self._close()
                return
            self._send(self.mux.accept_hello(int(self.heartbeat_interval * 1000)))
            self.start_heartbeat()
            _log.info("fleet link from {node} ({peer}) open", node=self.peer_node, peer=self.label)
        elif isinstance(event, RegisterReceived):
            self._send(self.mux.refuse_registration(event.register.name,
                                                    "an inter-node link carries no mappings"))

    def stream_opened(self, stream: TunnelStream) -> None:
        mode = _MODES.get(stream.mapping)
        server = self.fleet.server
        if mode is None or mode not in server.public_modes:
            stream.reset(ResetCode.UNKNOWN_MAPPING)
        elif mode in ("http", "https"):
            from .httpmap import PublicHttp

            stream.attach(PublicHttp(server, mode, via_fleet=True))
        else:
            try:
                local = server.open_default(mode, stream.getPeer())
            except TunnelStateError:
                local = None
            if local is None:
                stream.reset(ResetCode.UNKNOWN_MAPPING)
                return
            splice = Splice(server.reactor, idle_timeout=server.cfg.idle_timeout)
            stream.attach(SpliceProtocol(splice, A))
            local.attach(SpliceProtocol(splice, B))

    def tunnel_lost(self, reason: Failure) -> None:
        self.fleet.incoming.discard(self)
        if self.heartbeat is not None:  # it had authenticated
            _log.info("fleet link from {node} closed", node=self.peer_node)


class LinkConnection(TunnelConnection):
    """Node A's end of its link to a peer node; :meth:`when_ready` fires once authenticated."""

    def __init__(self, pool: LinkPool, claim: Claim) -> None:
        cfg = pool.fleet.server.cfg
        super().__init__(pool.fleet.server.reactor, True, heartbeat_interval=cfg.heartbeat_interval,
                         heartbeat_timeout=cfg.heartbeat_timeout)
        self.pool = pool
        self.claim = claim
        self._waiters: list[Deferred[LinkConnection]] = []

    def when_ready(self) -> Deferred[LinkConnection]:
        if self.mux.is_open:
            return succeed(self)
        d: Deferred[LinkConnection] = Deferred()
        self._waiters.append(d)
        return d

    def give_up(self, failure: Failure) -> None:
        """The link will not open: its waiters fail."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)

    def tunnel_made(self) -> None:
        _no_delay(self.transport)
        fleet = self.pool.fleet
        self._send(self.mux.hello(client=fleet.node_id[:64],  # HELLO allows 64 characters
                                  token=fleet.secret.decode("utf-8", "surrogatepass")))

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloAccepted):
            self.start_heartbeat(min(self.heartbeat_interval, event.heartbeat_ms / 1000))
            _log.info("fleet link to {node} ({addr}) open", node=self.claim.node,
                      addr=self.claim.address)
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(self)
        elif isinstance(event, AuthRejected):
            _log.error("fleet node {node} refused our fleet secret: {reason}",
                       node=self.claim.node, reason=event.reason)
            self._close()

    def tunnel_lost(self, reason: Failure) -> None:
        self.pool.lost(self)
        self.give_up(reason)


class LinkPool:
    """One link per peer node, opened on first use and reused by every stream."""

    def __init__(self, fleet: FleetTunnels) -> None:
        self.fleet = fleet
        self.links: dict[str, LinkConnection] = {}  # node id → link (open or opening)

    def get(self, claim: Claim) -> Deferred[LinkConnection]:
        """The open link to the node of ``claim`` (connecting first if needed)."""
        link = self.links.get(claim.node)
        if link is not None and link.claim.address != claim.address:
            link.go_away("the node moved")  # restarted elsewhere: a new link
            link = None
        if link is None:
            link = self._connect(claim)
        return link.when_ready()

    def _connect(self, claim: Claim) -> LinkConnection:
        fleet = self.fleet
        addr = parse_address(claim.address)
        link = LinkConnection(self, claim)
        self.links[claim.node] = link
        factory = Factory.forProtocol(lambda: link)  # type: ignore[arg-type]
        factory.noisy = False
        endpoint = endpoint_for(fleet.server.reactor, addr.host, addr.port,
                                fleet.server.cfg.connect_timeout)

        def failed(failure: Failure) -> None:
            if self.links.get(claim.node) is link:
                del self.links[claim.node]
            _log.info("fleet: cannot reach node {node} at {addr}: {why}", node=claim.node,
                      addr=claim.address, why=failure.getErrorMessage())
            link.give_up(failure)

        endpoint.connect(factory).addErrback(failed)
        return link

    def lost(self, link: LinkConnection) -> None:
        if self.links.get(link.claim.node) is link:
            del self.links[link.claim.node]
        self.fleet.routes_of_link_gone(link)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            link.go_away("node shutting down")


class RemoteRoute:
    """A route served by another node over the link (duck-types :class:`.server.Route`)."""

    rules = ()

    def __init__(self, link: LinkConnection, mode: str) -> None:
        self.link = link
        self.mode = mode
        self.name = SERVICES[mode]
        self.owner = f"fleet node {link.claim.node!r}"

    def open(self, peer: Any) -> TunnelStream | None:
        if not self.link.mux.is_open:
            return None
        return self.link.open_stream(self.name, peer)


class FleetTunnels:
    """A tunnel server's part of the fleet: claims, renewals, and carrying requests to holders."""

    def __init__(self, server: TunnelServer, directory: ITunnelDirectory, secret: str,
                 renew_every: float | None = None, availability: Any = None,
                 cache_ttl: float = LOOKUP_CACHE_TTL) -> None:
        self.server = server
        self.directory = directory
        self.node_id = directory.node_id
        self.secret = secret.encode("utf-8", "surrogatepass")
        self.pool = LinkPool(self)
        self.incoming: set[LinkServerConnection] = set()  # links other nodes opened to us
        self.remote: dict[tuple[str, str], RemoteRoute] = {}  # (node, mode) → route, for reuse
        self.renew_every = renew_every
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[tuple[str, str | None], tuple[float, list[Claim]]] = OrderedDict()
        self.availability = availability  # has on_change/off_change(callback(bool)): the Redis manager
        self._renewer: LoopingCall | None = None

    # --- life ---

    def start(self) -> None:
        """Renew the claims every ``renew_every`` seconds (the fleet heartbeat's period, lease / 3)
        and at once when the store comes back after an outage."""
        if self.renew_every and self._renewer is None:
            self._renewer = LoopingCall(self.renew)
            self._renewer.clock = self.server.reactor
            self._renewer.start(self.renew_every, now=False)
            if self.availability is not None:
                self.availability.on_change(self._availability)

    def _availability(self, available: bool) -> None:
        if available:
            self.renew()

    def stop(self) -> Deferred[None]:
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
            if self.availability is not None:
                self.availability.off_change(self._availability)
        self._renewer = None
        self.pool.close_all()
        for link in list(self.incoming):
            link.go_away("node shutting down")
        return self._quiet(self.directory.release_all(), "release the tunnel claims")

    def renew(self) -> Deferred[None]:
        """Extend this node's claims (the fleet heartbeat calls this)."""
        return self._quiet(self.directory.renew(), "renew the tunnel claims")

    def link_factory(self) -> Factory:
        """The protocol factory for the ``advertise`` listener."""
        factory: Factory = Factory.forProtocol(lambda: LinkServerConnection(self))  # type: ignore[arg-type]
        factory.noisy = False
        return factory

    # --- claims (called by the TunnelServer) ---

    def route_added(self, route: Route) -> None:
        for key in route_keys(route):
            self._quiet(self.directory.claim(route.mode, key), "claim a tunnel route")

    def route_removed(self, route: Route) -> None:
        for key in route_keys(route):
            self._quiet(self.directory.release(route.mode, key), "release a tunnel route")

    def _quiet(self, d: Deferred[Any], what: str) -> Deferred[None]:
        """Directory errors are logged, never raised; an outage is not (Redis logs it once)."""
        def failed(failure: Failure) -> None:
            if failure.check(RedisUnavailable):
                return  # the claims are re-created by the renewal when Redis is back
            _log.info("fleet: cannot {what}: {why}", what=what, why=failure.getErrorMessage())

        return d.addErrback(failed)

    # --- finding a holder node ---

    def find(self, mode: str, host: str | None) -> Deferred[Any]:
        """Fires with a :class:`RemoteRoute` to a live node that holds ``host`` (or the mode's
        default), or with None."""
        now = self.server.reactor.seconds()
        cached = self._cache.get((mode, host))
        if cached is not None and cached[0] > now:
            d: Deferred[Any] = succeed(cached[1])
        else:
            keys = lookup_keys(host) if host is not None else [""]
            d = self.directory.lookup(mode, keys)
            d.addCallback(self._remember, mode, host, now)
        d.addCallback(self._pick, mode, host)

        def failed(failure: Failure) -> None:
            if not failure.check(RedisUnavailable):
                _log.info("fleet: tunnel lookup for {mode} {host} failed: {why}", mode=mode,
                          host=host or "(default)", why=failure.getErrorMessage())
            return None

        d.addErrback(failed)
        return d

    def _remember(self, claims: list[Claim], mode: str, host: str | None, now: float) -> list[Claim]:
        """Keep a positive answer for ``cache_ttl`` (bounded LRU): no Redis trip per request."""
        if claims and self.cache_ttl > 0:
            self._cache[(mode, host)] = (now + self.cache_ttl, claims)
            self._cache.move_to_end((mode, host))
            while len(self._cache) > LOOKUP_CACHE_SIZE:
                self._cache.popitem(last=False)
        return claims

    def _pick(self, claims: list[Claim], mode: str, host: str | None) -> Deferred[Any]:
        others = [c for c in claims if c.node != self.node_id]
        # a node we already hold a link to first, then the others in order
        others.sort(key=lambda c: (c.node not in self.pool.links, c.node))
        d = self._try(others, mode)

        def forget_if_none(route: RemoteRoute | None) -> RemoteRoute | None:
            if route is None:
                self._cache.pop((mode, host), None)  # no holder reachable: ask the directory next time
            return route

        return d.addCallback(forget_if_none)

    def _try(self, claims: list[Claim], mode: str) -> Deferred[Any]:
        if not claims:
            return succeed(None)
        claim, rest = claims[0], claims[1:]
        d: Deferred[Any] = self.pool.get(claim)
        d.addCallback(self._route, mode)
        d.addErrback(lambda _f: self._try(rest, mode))
        return d

    def _route(self, link: LinkConnection, mode: str) -> RemoteRoute:
        key = (link.claim.node, mode)
        route = self.remote.get(key)
        if route is None or route.link is not link:
            route = self.remote[key] = RemoteRoute(link, mode)
        return route

    def routes_of_link_gone(self, link: LinkConnection) -> None:
        for key, route in list(self.remote.items()):
            if route.link is link:
                del self.remote[key]

    def open_default(self, mode: str, peer: Any) -> Any:
        """A stream for ``map_tcp_bind`` / ``map_proxy_bind``: local client first, else a holder."""
        local = self.server.open_default(mode, peer)
        if local is not None:
            return local
        d = self.find(mode, None)
        d.addCallback(lambda route: route.open(peer) if route is not None else None)
        return d
