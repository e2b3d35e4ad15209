"""Build the tunnel features of a ``[proxy]`` section: server, client, chaining.

:func:`plan_lines` checks what cannot start (before anything is bound) and describes the
listeners; :func:`build_tunnel` binds them.  Both raise
:class:`~wmproxy_tw.listen.StartupError` with one line naming the cause.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.protocols.tls import TLSMemoryBIOFactory

from ..config.grammar import Address, is_loopback_host
from ..config.model import Proxy
from ..listen import ListenerRegistry, StartupError
from ..tls import TLSConfigError, client_creator, server_creator

__all__ = ["build_tunnel", "plan_lines"]


def _addrs(addrs: Any) -> str:
    return " ".join(str(a) for a in addrs or ())


def _client_tls(p: Proxy) -> bool:
    return p.ts or p.two_way_tls


def _server_tls(p: Proxy) -> bool:
    return p.tc or p.two_way_tls


def plan_lines(p: Proxy) -> list[str]:
    """What the tunnel parts of ``p`` will listen on / connect to; StartupError if impossible."""
    lines: list[str] = []
    maps = {"http": p.map_http_bind, "https": p.map_https_bind, "tcp": p.map_tcp_bind,
            "proxy": p.map_proxy_bind}
    if p.mode == "client" and p.server is None:
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
        security = "mutual TLS" if p.two_way_tls else "TLS" if p.tc else "cleartext"
        auth = "tokens" if p.tokens else "username/password" if p.username else "no auth"
        lines.append(f"tunnel server on {_addrs(p.center_addr)} ({security}, {auth})")
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
        lines.append(f"tunnel client of {p.server} ({security}) publishing {names}")
        for addr in p.bind or ():
            lines.append(f"forward proxy on {addr} chained to {p.server}")
    elif p.mappings:
        raise StartupError("proxy.mappings need server = \"host:port\" (the tunnel server "
                           "to publish them on)")
    return lines


class _Stopper(service.Service):
    """Sends GOAWAY to every tunnel client when the service stops."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def stopService(self) -> Any:
        super().stopService()
        self.server.stop()
        return None


def build_tunnel(reactor: Any, p: Proxy, registry: ListenerRegistry,
                 parent: service.MultiService) -> list[Any]:
    """Bind the tunnel server / client of ``p``; returns the features built."""
    try:
        return _build(reactor, p, registry, parent)
    except TLSConfigError as exc:
        raise StartupError(f"proxy: {exc}") from None


def _build(reactor: Any, p: Proxy, registry: ListenerRegistry,
           parent: service.MultiService) -> list[Any]:
    from ..forward.server import ForwardFactory
    from .client import TunnelClient
    from .connection import StreamSpliceFactory
    from .httpmap import PublicHttpFactory
    from .server import TunnelServer

    features: list[Any] = []
    own: tuple[Address, ...] = tuple(a for addrs in (p.bind, p.center_addr, p.map_http_bind,
                                                     p.map_https_bind, p.map_tcp_bind,
                                                     p.map_proxy_bind) for a in addrs or ())
    if p.center_addr:
        server = TunnelServer(reactor, p, registry, ForwardFactory(reactor, p, own_listeners=own))
        factory: Any = server.factory()
        if _server_tls(p):
            assert p.cert and p.key
            creator = server_creator([(p.cert, p.key)],
                                     client_ca=p.ca if p.two_way_tls else None)
            factory = TLSMemoryBIOFactory(creator, False, factory)
        for addr in p.center_addr:
            registry.bind_tcp(addr, factory, "tunnel server", p.max_connections)
        if p.map_http_bind:
            server.public_modes.add("http")
            for addr in p.map_http_bind:
                registry.bind_tcp(addr, PublicHttpFactory(server, "http"), "tunnel http",
                                  p.max_connections)
        if p.map_https_bind:
            assert p.map_cert and p.map_key
            server.public_modes.add("https")
            tls = server_creator([(p.map_cert, p.map_key)], alpn=[b"http/1.1"])
            for addr in p.map_https_bind:
                registry.bind_tcp(addr, TLSMemoryBIOFactory(tls, False,
                                                            PublicHttpFactory(server, "https")),
                                  "tunnel https", p.max_connections)
        for mode, addrs in (("tcp", p.map_tcp_bind), ("proxy", p.map_proxy_bind)):
            if addrs:
                server.public_modes.add(mode)
                splice = StreamSpliceFactory(
                    reactor, lambda peer, m=mode: server.open_default(m, peer), p.idle_timeout,
                    f"tunnel {mode}")
                for addr in addrs:
                    registry.bind_tcp(addr, splice, f"tunnel {mode}", p.max_connections)
        _Stopper(server).setServiceParent(parent)
        features.append(server)
    if p.server is not None:
        needs_engine = any(m.mode == "proxy" for m in p.mappings)
        forward = ForwardFactory(reactor, p, own_listeners=own) if needs_engine else None
        client = TunnelClient(reactor, p, forward)
        if _client_tls(p):
            client.use_tls(client_creator(
                p.domain or p.server.host, ca_path=p.ca,
                client_cert=(p.cert, p.key) if p.two_way_tls and p.cert and p.key else None))
        client.setServiceParent(parent)
        for addr in p.bind or ():
            registry.bind_tcp(addr, client.chain_factory(), "forward proxy (chained)",
                              p.max_connections)
        features.append(client)
    return features
