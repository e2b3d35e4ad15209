"""The reverse proxy as a feature: listeners, virtual hosts, groups, health.

:func:`build_reverse` turns ``[http]`` into a :class:`ReverseProxy` service
(upstream groups shared by name, their active health checkers as child
services, the connection pool, the access logs) and one
:class:`ReverseSite` per listening address; :meth:`ReverseProxy.bind` gives
them to the listener registry (TLS listeners wrapped with every certificate
of the servers on that port, chosen by SNI, the first one the default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import resource, server

from ..balance import HealthChecker, UpstreamGroup, probe_for
from ..balance.build import Target, resolve_target
from ..balance.model import GroupSpec
from ..config.grammar import Address
from ..config.model import Config, Http, HttpServer, Location
from ..headers import split_rules
from ..listen import ListenerRegistry, StartupError
from ..observe.accesslog import AccessLogError, AccessLogs, install_reopen_signal
from ..tls import TLSConfigError, client_creator, server_creator
from .channel import HTTP11Channel, Limits
from .handlers import LocationCtx, ProxyHandler, build_handler, build_steps, respond_error
from .request import ReverseRequest
from .route import RouteInfo, VirtualHosts, compile_rule

__all__ = ["ServerCtx", "ReverseSite", "ReverseProxy", "build_reverse", "plan_lines", "limits_of"]

_log = Logger()


@dataclass
class ServerCtx:
    """A compiled ``[[http.server]]``: its locations in file order."""

    index: int
    config: HttpServer
    locations: list[LocationCtx]

    def match(self, info: RouteInfo) -> Optional[LocationCtx]:
        for loc in self.locations:
            if loc.rule.test(info):
                return loc
        return None


def limits_of(srv: HttpServer) -> Limits:
    return Limits(
        max_header_size=srv.max_header_size or 16 * 1024,
        max_headers=srv.max_headers or 100,
        max_body_size=srv.client_max_body_size or None,  # 0: no limit (as nginx)
        header_timeout=srv.client_header_timeout or 10.0,
        keepalive_timeout=srv.client_keepalive_timeout or 75.0,
        read_timeout=srv.client_read_timeout or 60.0,
        write_timeout=srv.client_write_timeout or 60.0,
    )


class ReverseSite(server.Site):
    """The twisted.web site of one listening address: picks a server, runs the pipeline."""

    requestFactory = ReverseRequest  # type: ignore[assignment]
    noisy = False

    def __init__(self, reactor: Any, vhosts: VirtualHosts[ServerCtx], limits: Limits, name: str) -> None:
        super().__init__(resource.Resource(), reactor=reactor)
        self.clock = reactor
        self.vhosts = vhosts
        self.limits = limits
        self.name = name

    def buildProtocol(self, addr: Any) -> HTTP11Channel:  # type: ignore[override]
        return HTTP11Channel(self, self.limits)

    def log(self, request: Any) -> None:
        """Called by ``Request.finish``: the access-log line."""
        request.log_once()

    def dispatch(self, request: ReverseRequest) -> None:
        """The pipeline of SPEC §4, from location match to handler."""
        srv = self.vhosts.pick(request.host_name)
        loc = srv.match(request.route_info())
        if loc is None:
            respond_error(request, 404)
            return
        request.ctx = loc
        request.response_rules = loc.response_rules
        if request.websocket and not loc.is_ws:
            respond_error(request, 403, "WebSocket upgrade refused: this location does not allow WebSocket "
                                        "(is_ws is not set)")
            return
        if request.has_body and not request.limit_body(loc.config.client_max_body_size):
            return
        self._run(request, loc, 0)

    def _run(self, request: ReverseRequest, loc: LocationCtx, i: int) -> None:
        steps = loc.steps
        while i < len(steps):
            outcome = steps[i].check(request, loc)
            i += 1
            if outcome is True:
                continue
            if isinstance(outcome, Deferred):
                outcome.addCallback(self._resumed, request, loc, i).addErrback(self._crashed, request)
            return
        handler = loc.handler
        try:
            if handler.streams_body or not request.has_body:
                handler.render(request, loc)
            else:
                request.discard_body(lambda: self._render_later(handler, request, loc))
        except Exception:
            self._crashed(Failure(), request)

    def _resumed(self, ok: Any, request: ReverseRequest, loc: LocationCtx, i: int) -> None:
        if ok and not request._disconnected:
            self._run(request, loc, i)

    def _render_later(self, handler: Any, request: ReverseRequest, loc: LocationCtx) -> None:
        try:
            handler.render(request, loc)
        except Exception:
            self._crashed(Failure(), request)

    def _crashed(self, f: Failure, request: ReverseRequest) -> None:
        _log.failure("reverse proxy: handling {url} failed", f, url=request.uri.decode("latin-1"))
        respond_error(request, 500)


class ReverseProxy(MultiService):
    """Everything ``[http]`` needs at run time (see the module docstring)."""

    def __init__(self, reactor: Any, config: Config) -> None:
        super().__init__()
        http = config.http
        assert http is not None
        self.reactor = reactor
        self.http = http
        from .upstream import UpstreamPool

        self.pool = UpstreamPool(reactor)
        self.logs = AccessLogs(http.log_format, http.log_names)
        self.groups: dict[GroupSpec, UpstreamGroup] = {}
        self._tls_clients: dict[tuple[str, Optional[str], bool], Any] = {}
        self.sites: list[tuple[Address, bool, ReverseSite, Any, Optional[int]]] = []
        self._restore_signal: Any = None
        try:
            self._build(http)
        except (AccessLogError, TLSConfigError) as e:
            self.logs.close()
            raise StartupError(str(e)) from None
        except ValueError as e:
            self.logs.close()
            raise StartupError(str(e)) from None

    # -- building ------------------------------------------------------------------------
    def group(self, spec: GroupSpec, tls: Any = None) -> UpstreamGroup:
        """The one UpstreamGroup of ``spec`` (shared by every location naming it),
        with its active health checker (over TLS for https upstreams)."""
        g = self.groups.get(spec)
        if g is None:
            g = self.groups[spec] = UpstreamGroup(spec, self.reactor)
            if spec.health_check is not None:
                probe = probe_for(self.reactor, spec.health_check, tls)
                HealthChecker(g, self.reactor, probe).setServiceParent(self)
        return g

    def _tls_client(self, target: Target, loc: Location) -> Any:
        name = loc.proxy_ssl_name or _host_only(target.host_header)
        key = (name, loc.proxy_ssl_ca, loc.proxy_ssl_verify is not False)
        creator = self._tls_clients.get(key)
        if creator is None:
            creator = self._tls_clients[key] = client_creator(name, ca_path=loc.proxy_ssl_ca,
                                                              verify=loc.proxy_ssl_verify is not False)
        return creator

    def _build(self, http: Http) -> None:
        by_addr: dict[tuple[Address, bool], list[ServerCtx]] = {}
        for si, srv in enumerate(http.server):
            ctx = ServerCtx(si, srv, [self._location(http, srv, si, li, loc) for li, loc in enumerate(srv.location)])
            for addr in srv.bind_addr:
                by_addr.setdefault((addr, False), []).append(ctx)
            for addr in srv.bind_ssl:
                by_addr.setdefault((addr, True), []).append(ctx)
        for (addr, tls), servers in by_addr.items():
            if (addr, not tls) in by_addr:
                raise ValueError(f"http.server: {addr} is used both for bind_addr and bind_ssl")
            vhosts = VirtualHosts([((s.config.up_name or "").split(), s) for s in servers])
            default = servers[0].config
            name = f"reverse proxy ({'https' if tls else 'http'})"
            sizes = [loc.config.client_max_body_size for srv in servers for loc in srv.locations]
            # The channel enforces the largest; each location its own, once routed.
            biggest = None if (not sizes or not all(sizes)) else max(s for s in sizes if s)
            limits = dataclasses.replace(limits_of(default), max_body_size=biggest)
            site = ReverseSite(self.reactor, vhosts, limits, name)
            factory: Any = site
            if tls:
                pairs: list[tuple[str, str]] = []
                for s in servers:
                    pair = (s.config.cert, s.config.key)
                    if pair[0] and pair[1] and pair not in pairs:
                        pairs.append((pair[0], pair[1]))
                factory = TLSMemoryBIOFactory(server_creator(pairs), False, site)
                factory.noisy = False
            self.sites.append((addr, tls, site, factory, default.max_connections))

    def _location(self, http: Http, srv: HttpServer, si: int, li: int, loc: Location) -> LocationCtx:
        where = f"http.server[{si}].location[{li}]"
        try:
            rule = compile_rule(loc.rule, http.match_names)
        except ValueError as e:
            raise ValueError(f"{where}.rule: {e}") from None
        req_rules, resp_rules = split_rules(loc.headers or ())
        ctx = LocationCtx(where, loc, srv, rule, steps=build_steps(loc), request_rules=req_rules,
                          response_rules=resp_rules, access_log=self.logs.get(loc.access_log))
        ctx.handler = build_handler(loc, where, _Env(self, http, srv, loc, where))
        return ctx

    def bind(self, registry: ListenerRegistry) -> None:
        """Give every listening address to the registry (raises StartupError)."""
        for addr, tls, _site, factory, max_conn in self.sites:
            registry.bind_tcp(addr, factory, f"reverse proxy ({'https' if tls else 'http'})", max_conn)

    # -- running -------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._restore_signal = install_reopen_signal(self.reactor)

    def stopService(self) -> Any:
        d = super().stopService()
        if self._restore_signal is not None:
            self._restore_signal()
            self._restore_signal = None
        self.pool.close()
        self.logs.close()
        return d

    def snapshot(self) -> list[dict[str, Any]]:
        return [g.snapshot() for g in self.groups.values()]


class _Env:
    """What :func:`build_handler` may ask for while building one location."""

    def __init__(self, feature: ReverseProxy, http: Http, srv: HttpServer, loc: Location, where: str) -> None:
        self.feature = feature
        self.scopes = (loc.upstream, srv.upstream, http.upstream)
        self.where = where

    def proxy_handler(self, loc: Location, request_rules: Any) -> ProxyHandler:
        url = loc.proxy_url or ""
        try:
            target = resolve_target(url, self.scopes)
        except ValueError as e:
            raise ValueError(f"{self.where}.proxy_url: {e}") from None
        if target.scheme not in ("http", "https", "ws", "wss"):
            raise ValueError(f"{self.where}.proxy_url: {url!r}: expected an http:// or https:// URL")
        tls = self.feature._tls_client(target, loc) if target.scheme in ("https", "wss") else None
        group = self.feature.group(target.group, tls)
        return ProxyHandler(self.feature.reactor, self.feature.pool, group, target, loc, request_rules, tls)


def _host_only(authority: str) -> str:
    if authority.startswith("["):
        return authority[1:authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def build_reverse(reactor: Any, config: Config) -> ReverseProxy:
    """Build the ``[http]`` feature (raises StartupError with one line)."""
    return ReverseProxy(reactor, config)


def plan_lines(config: Config) -> list[str]:
    """Check ``[http]`` before binding and describe its listeners (StartupError)."""
    http = config.http
    if http is None or not http.server:
        return []
    for si, srv in enumerate(http.server):
        for li, loc in enumerate(srv.location):
            if loc.proxy_url and loc.proxy_url.strip() and loc.static_response is None:
                try:
                    resolve_target(loc.proxy_url, (loc.upstream, srv.upstream, http.upstream))
                except ValueError as e:
                    raise StartupError(f"http.server[{si}].location[{li}].proxy_url: {e}") from None
            fmt = loc.access_log.format if loc.access_log is not None else None
            if fmt is not None and fmt not in http.log_format:
                raise StartupError(f"http.server[{si}].location[{li}].access_log: no log_format named {fmt!r}")
    lines = []
    seen: dict[tuple[Address, bool], list[str]] = {}
    for srv in http.server:
        for tls, addrs in ((False, srv.bind_addr), (True, srv.bind_ssl)):
            for addr in addrs:
                seen.setdefault((addr, tls), []).append(srv.up_name or "(no name)")
    for (addr, tls), names in seen.items():
        lines.append(f"reverse proxy ({'https' if tls else 'http'}) on {addr}: {', '.join(names)}")
    return lines

