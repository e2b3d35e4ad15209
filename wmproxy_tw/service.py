"""The running proxy: features built from a Config, bound to listeners."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from .config import Config, Loaded
from .config.grammar import is_loopback_host
from .listen import ListenerRegistry, StartupError
from .reverse.files import file_root, standalone, standalone_site

__all__ = ["ProxyService", "plan"]

_log = Logger()


def _unsupported(config: Config) -> list[str]:
    """Sections that parse but are not served yet: refused, never ignored."""
    out = []
    if config.http is not None and config.http.server and not all(map(standalone, config.http.server)):
        out.append("http.server")
    if config.stream is not None and config.stream.server:
        out.append("stream.server")
    if config.fleet is not None:
        out.append("fleet")
    p = config.proxy
    if p is not None:
        if p.center_addr or p.mode == "server":
            out.append("proxy.center_addr (tunnel server)")
        if p.server:
            out.append("proxy.server (tunnel client / chaining)")
        if p.mappings:
            out.append("proxy.mappings")
    return out


def plan(config: Config) -> list[str]:
    """Check what can't start (before binding) and describe the listeners."""
    missing = _unsupported(config)
    if missing:
        raise StartupError("not supported yet: " + ", ".join(missing))
    lines = []
    p = config.proxy
    if p is not None and p.bind:
        for addr in p.bind:
            open_proxy = p.username is None and not is_loopback_host(addr.host)
            if open_proxy and not p.allow_open_proxy:
                raise StartupError(
                    f"proxy.bind: refusing to run an unauthenticated proxy on {addr} (not loopback): "
                    "set username/password, or allow_open_proxy = true if you really mean it"
                )
            lines.append(f"forward proxy ({' '.join(sorted(p.flag))}) on {addr}"
                         + (" with auth" if p.username else ""))
    for srv in config.http.server if config.http is not None else ():
        lines += [f"file server of {file_root(srv)} on {addr}" for addr in srv.bind_addr]
    return lines


class ProxyService(service.MultiService):
    """Owns the listener registry and the features of one configuration."""

    def __init__(self, reactor: Any, loaded: Loaded) -> None:
        super().__init__()
        self.reactor = reactor
        self.loaded = loaded
        self.registry = ListenerRegistry(reactor)
        self.registry.setServiceParent(self)
        self.features: list[Any] = []

    @property
    def config(self) -> Config:
        return self.loaded.config

    def bind_all(self) -> None:
        """Build every feature and bind its listeners; raise StartupError."""
        plan(self.config)
        p = self.config.proxy
        if p is not None and p.bind:
            from .forward.server import ForwardFactory

            factory = ForwardFactory(self.reactor, p, own_listeners=p.bind)
            self.features.append(factory)
            for addr in p.bind:
                self.registry.bind_tcp(addr, factory, "forward proxy", p.max_connections)
        for srv in self.config.http.server if self.config.http is not None else ():
            site = standalone_site(srv, self.reactor)  # interim, until the reverse pipeline serves [http]
            for addr in srv.bind_addr:
                self.registry.bind_tcp(addr, site, "file server", srv.max_connections)

    def abandon(self) -> None:
        """Close what was bound after a start-up failure."""
        for kind, addr in list(self.registry.listeners):
            self.registry.close(kind, addr)

    def stopService(self) -> Deferred[Any]:
        return maybeDeferred(super().stopService)
