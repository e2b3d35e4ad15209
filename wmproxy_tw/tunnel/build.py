"""Build the tunnel features of a ``[proxy]`` section: server, client, chaining.

:func:`plan_lines` checks what cannot start (before anything is bound); :func:`build`
makes the features (:class:`TunnelServerFeature`, :class:`TunnelClientFeature`).  Both raise
:class:`~wmproxy_tw.listen.StartupError` with one line naming the cause.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from typing import Callable, Iterable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from ..config.grammar import Address, is_loopback_host
from ..config.model import Config, Fleet, Proxy
from ..feature import BuildContext, Feature, IFeature, ListenSpec
from ..listen import ListenerRegistry, StartupError
from ..tls import TLSConfigError, client_creator, server_creator

__all__ = ["TunnelClientFeature", "TunnelServerFeature", "build", "plan_lines"]


def _addrs(addrs: Any) -> str:
    return " ".join(str(a) for a in addrs or ())


def _client_tls(p: Proxy) -> bool:
    return p.ts or p.two_way_tls


def _server_tls(p: Proxy) -> bool:
    return p.tc or p.two_way_tls


def _servers(p: Proxy) -> str:
    """The tunnel servers a client lists, and how many it stays attached to."""
    servers = p.server or ()
    text = " ".join(str(a) for a in servers)
    if len(servers) > 1:
        text += f" (attached to {p.attach_count} at once)"
    return text


def _server_summary(p: Proxy) -> str:
    security = "mutual TLS" if p.two_way_tls else "TLS" if p.tc else "cleartext"
    auth = "tokens" if p.tokens else "username/password" if p.username else "no auth"
    return f"{security}, {auth}"


def plan_lines(p: Proxy) -> list[str]:
    """What the tunnel parts of ``p`` will listen on / connect to; StartupError if impossible."""
    lines: list[str] = []
    maps = {"http": p.map_http_bind, "https": p.map_https_bind, "tcp": p.map_tcp_bind,
            "proxy": p.map_proxy_bind}
    if p.mode == "client" and not p.server:
        raise StartupError('proxy.mode = "client" needs server = "host:port" (the tunnel server)')
    if p.center_addr:
        if _server_tls(p) and not p.cert:
            raise StartupError("proxy.tc: the tunnel server needs cert and key for TLS "
                               "(there is no built-in certificate; see `wmproxy gen-cert`)")
        if p.two_way_tls and not p.ca:
            raise StartupError("proxy.two_way_tls: the tunnel server needs ca, the CA file that "
                               "signs client certificates")
        if p.map_https_bind and not p.map_cert:
            raise StartupError("proxy.map_https_bind needs map_cert and map_key "
                               "(there is no built-in certificate)")
        open_server = p.username is None and not p.tokens
        exposed = [a for a in p.center_addr if not is_loopback_host(a.host)]
        if open_server and exposed and not p.allow_open_proxy:
            raise StartupError(f"proxy.center_addr: refusing to run a tunnel server without "
                               f"username/password or tokens on {exposed[0]} (not loopback): set "
                               "credentials, or allow_open_proxy = true if you really mean it")
        lines.append(f"tunnel server on {_addrs(p.center_addr)} ({_server_summary(p)})")
        for mode, addrs in maps.items():
            if addrs:
                lines.append(f"tunnel {mode} mappings on {_addrs(addrs)}")
    else:
        for mode, addrs in maps.items():
            if addrs:
                raise StartupError(f"proxy.map_{mode}_bind needs center_addr (a tunnel server)")
    if p.server is not None:
        if p.two_way_tls and not p.cert:
            raise StartupError("proxy.two_way_tls: the tunnel client needs cert and key "
                               "(its client certificate)")
        if any(m.mode == "proxy" for m in p.mappings) and p.username is None and not p.allow_open_proxy:
            raise StartupError("proxy.mappings: a proxy mapping exposes this node's forward proxy "
                               "on the server's map_proxy_bind: set username/password, or "
                               "allow_open_proxy = true if you really mean it")
        security = ("mutual TLS" if p.two_way_tls else "TLS") if _client_tls(p) else "cleartext"
        names = ", ".join(f"{m.name} ({m.mode})" for m in p.mappings) or "no mappings"
        lines.append(f"tunnel client of {_servers(p)} ({security}) publishing {names}")
        for addr in p.bind or ():
            lines.append(f"forward proxy on {addr} chained to {_servers(p)}")
    elif p.mappings:
        raise StartupError("proxy.mappings need server = \"host:port\" (the tunnel server "
                           "to publish them on)")
    return lines


class _Late(Factory):
    """A factory whose protocols come from ``make()`` at accept time.

    The tunnel features hand their current server or client to the protocols
    this way, so a reload that keeps the same server object (same settings)
    keeps every connected tunnel client.
    """

    noisy = False

    def __init__(self, make: Callable[[], Protocol]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.make()


class TunnelServerFeature(Feature):
    """``center_addr`` and the public ``map_*_bind`` listeners of a tunnel server."""

    name = "tunnel-server"

    def __init__(self, ctx: BuildContext, p: Proxy, own: tuple[Address, ...], fleet: Optional[Fleet] = None) -> None:
        from ..forward.server import ForwardFactory
        from .connection import StreamSpliceFactory
        from .httpmap import PublicHttp
        from .server import ServerConnection, TunnelServer

        super().__init__()
        self.cfg = p
        self.fleet_cfg = fleet
        self.adopted = False
        # remote_port listeners open and close with their clients: their own registry, so a
        # reload (which diffs the service's listeners) leaves them alone
        self.server = TunnelServer(ctx.reactor, p, ListenerRegistry(ctx.reactor),
                                   ForwardFactory(ctx.reactor, p, own_listeners=own, stats=ctx.stats))
        center: Any = _Late(lambda: ServerConnection(self.server))
        if _server_tls(p):
            assert p.cert and p.key
            center = TLSMemoryBIOFactory(server_creator([(p.cert, p.key)], client_ca=p.ca if p.two_way_tls else None),
                                         False, center)
        self.specs = [ListenSpec("tcp", a, "tunnel server", factory=center, max_connections=p.max_connections,
                                 description=f"tunnel server on {a} ({_server_summary(p)})")
                      for a in p.center_addr or ()]
        if p.map_http_bind:
            self.server.public_modes.add("http")
            http = _Late(lambda: PublicHttp(self.server, "http"))
            self.specs += [ListenSpec("tcp", a, "tunnel http", factory=http, max_connections=p.max_connections,
                                     description=f"tunnel http mappings on {a}")
                           for a in p.map_http_bind]
        if p.map_https_bind:
            assert p.map_cert and p.map_key
            self.server.public_modes.add("https")
            tls = server_creator([(p.map_cert, p.map_key)], alpn=[b"http/1.1"])
            https = TLSMemoryBIOFactory(tls, False, _Late(lambda: PublicHttp(self.server, "https")))
            self.specs += [ListenSpec("tcp", a, "tunnel https", factory=https, max_connections=p.max_connections,
                                     description=f"tunnel https mappings on {a}")
                           for a in p.map_https_bind]
        for mode, addrs in (("tcp", p.map_tcp_bind), ("proxy", p.map_proxy_bind)):
            if addrs:
                self.server.public_modes.add(mode)
                splice = StreamSpliceFactory(ctx.reactor, partial(self.server.open_public, mode),
                                             p.idle_timeout, f"tunnel {mode}")
                self.specs += [ListenSpec("tcp", a, f"tunnel {mode}", factory=splice, max_connections=p.max_connections,
                                          description=f"tunnel {mode} mappings on {a}") for a in addrs]
        if fleet is not None:
            self._fleet_link(ctx, fleet)

    def _fleet_link(self, ctx: BuildContext, fleet: Fleet) -> None:
        """[fleet]: claims in the Redis directory, and the inter-node link on ``advertise``."""
        from .directory import RedisDirectory
        from .fleet import FleetTunnels, LinkServerConnection

        assert fleet.advertise is not None and fleet.secret is not None
        node = getattr(ctx, "fleet", None)  # the FleetFeature: the one Redis connection manager
        if node is None:
            raise StartupError("[fleet]: the fleet feature must be built before the tunnel server")
        directory = RedisDirectory(node.redis, node.key, node.node_id, str(fleet.advertise), fleet.lease)
        self.server.fleet = FleetTunnels(self.server, directory, fleet.secret, renew_every=fleet.lease / 3,
                                         availability=node.redis)
        link = _Late(lambda: LinkServerConnection(self.server.fleet))
        self.specs.append(ListenSpec("tcp", fleet.advertise, "fleet link", factory=link,
                                     description=f"fleet tunnel link on {fleet.advertise} (node {node.node_id})"))

    def listeners(self) -> Iterable[ListenSpec]:
        return self.specs

    def carry_state_from(self, old: IFeature) -> None:
        if isinstance(old, TunnelServerFeature) and old.cfg == self.cfg and old.fleet_cfg == self.fleet_cfg:
            # same settings: keep the server, its connected clients and their mappings
            modes = self.server.public_modes
            self.server = old.server
            self.server.public_modes = modes
            old.adopted = True

    def start(self) -> None:
        if self.server.fleet is not None:
            self.server.fleet.start()

    def stop(self) -> None:
        if not self.adopted:
            self.server.stop()
            if self.server.fleet is not None:
                self.server.fleet.stop()

    def drain(self) -> Optional[Deferred[Any]]:
        self.server.stop()
        self.server.listeners.close_all()
        if self.server.fleet is not None:
            return self.server.fleet.stop()
        return None

    def tunnel_clients(self) -> list[dict[str, Any]]:
        return [{"client": c.client_label} for c in self.server.connections]


class TunnelClientFeature(Feature):
    """The tunnel client of ``[proxy] server``, and chaining of ``bind`` to it."""

    name = "tunnel-client"

    def __init__(self, ctx: BuildContext, p: Proxy, own: tuple[Address, ...]) -> None:
        from ..forward.server import ForwardFactory
        from .client import TunnelClient
        from .connection import StreamSpliceFactory

        super().__init__()
        assert p.server
        self.cfg = p
        self.adopted = False
        needs_engine = any(m.mode == "proxy" for m in p.mappings)
        forward = ForwardFactory(ctx.reactor, p, own_listeners=own, stats=ctx.stats) if needs_engine else None
        self.client = TunnelClient(ctx.reactor, p, forward)
        if _client_tls(p):
            creators = {s: client_creator(
                p.domain or s.host, ca_path=p.ca,
                client_cert=(p.cert, p.key) if p.two_way_tls and p.cert and p.key else None)
                for s in p.server}
            self.client.use_tls_for(creators.__getitem__)
        chain = StreamSpliceFactory(ctx.reactor, lambda peer: self.client.open_chain(peer), p.idle_timeout,
                                    f"proxy chained to {_servers(p)}")
        self.specs = [ListenSpec("tcp", a, "forward proxy (chained)", factory=chain,
                                 max_connections=p.max_connections, description=f"forward proxy on {a} chained to {_servers(p)}")
                      for a in p.bind or ()]

    def listeners(self) -> Iterable[ListenSpec]:
        return self.specs

    def plan_notes(self) -> list[str]:
        """The --check line for the outgoing tunnel (it listens on nothing of its own)."""
        p = self.cfg
        security = ("mutual TLS" if p.two_way_tls else "TLS") if _client_tls(p) else "cleartext"
        names = ", ".join(f"{m.name} ({m.mode})" for m in p.mappings) or "no mappings"
        return [f"tunnel client of {_servers(p)} ({security}) publishing {names}"]

    def carry_state_from(self, old: IFeature) -> None:
        if isinstance(old, TunnelClientFeature) and old.cfg == self.cfg:
            # same settings: keep the connected client (and its registrations)
            self.client = old.client
            old.adopted = True

    def start(self) -> None:
        if not self.client.running:
            self.client.startService()

    def stop(self) -> None:
        if self.client.running and not self.adopted:
            self.client.stopService()

    def drain(self) -> Optional[Deferred[Any]]:
        if self.client.running:
            return maybeDeferred(self.client.stopService)
        return None

    def tunnel_clients(self) -> list[dict[str, Any]]:
        return [{"server": a.target_text, "connected": a.conn is not None}
                for a in self.client.attachments]


def build(ctx: BuildContext, config: Config) -> list[IFeature]:
    """The tunnel server and/or client of ``[proxy]`` (checked by :func:`plan_lines` first)."""
    p = config.proxy
    if p is None:
        return []
    plan_lines(p)  # refuses map_* without center_addr, mappings without server, ...
    if not (p.center_addr or p.server):
        return []
    own: tuple[Address, ...] = tuple(a for addrs in (p.bind, p.center_addr, p.map_http_bind, p.map_https_bind,
                                                     p.map_tcp_bind, p.map_proxy_bind) for a in addrs or ())
    if not config.disable_control:
        own += (config.control,)
    fleet = config.fleet if p.center_addr else None
    if fleet is not None:
        if fleet.advertise is None:
            raise StartupError("fleet.advertise is needed with a tunnel server: the host:port on which "
                               "the other fleet nodes reach this node's inter-node link")
        if fleet.secret is None:
            raise StartupError("fleet.secret is needed with a tunnel server: it authenticates the "
                               "inter-node links (at least 16 characters, the same on every node)")
        own += (fleet.advertise,)
    features: list[IFeature] = []
    try:
        if p.center_addr:
            features.append(TunnelServerFeature(ctx, p, own, fleet))
        if p.server:
            features.append(TunnelClientFeature(ctx, p, own))
    except TLSConfigError as exc:
        raise StartupError(f"proxy: {exc}") from None
    return features
