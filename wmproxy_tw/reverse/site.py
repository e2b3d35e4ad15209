"""The reverse proxy as a feature: listeners, virtual hosts, groups, health.

:func:`build` turns ``[http]`` into a :class:`ReverseFeature` (upstream
groups shared by name, their active health checkers as ``services``, the
connection pool, the access logs) and one :class:`ReverseSite` per listening
address, each a :class:`~wmproxy_tw.feature.ListenSpec` (TLS listeners
wrapped with every certificate of the servers on that port, chosen by SNI,
the first one the default).  Building has no side effects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

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
from ..feature import BuildContext, Feature, IFeature, ListenSpec
from ..limits import build_zones
from ..listen import StartupError
from ..observe.accesslog import AccessLogError, AccessLogs
from ..tls import TLSConfigError, client_creator, server_creator
from .channel import HTTP11Channel, Limits
from .files import FileCache
from .handlers import LocationCtx, ProxyHandler, build_handler, build_steps, respond_error
from .http2 import ALPNSwitch, alpn_for, check_http2
from .request import ReverseRequest
from .route import RouteInfo, VirtualHosts, compile_rule

__all__ = ["ServerCtx", "ReverseSite", "ReverseFeature", "build", "limits_of"]

_log = Logger()


#: Paths whose location decision a server remembers (forgotten all at once when full).
ROUTE_CACHE = 4096


@dataclass
class ServerCtx:
    """A compiled ``[[http.server]]``: its locations in file order."""

    index: int
    config: HttpServer
    locations: list[LocationCtx]

    def __post_init__(self) -> None:
        # When every rule looks at the path only, the decision is a function of the
        # path: remembered per normalised path (bounded).
        self._by_path: Optional[dict[str, Optional[LocationCtx]]] = (
            {} if all(loc.rule.path_only for loc in self.locations) else None)

    def match(self, info: RouteInfo) -> Optional[LocationCtx]:
        for loc in self.locations:
            if loc.rule.test(info):
                return loc
        return None

    def route(self, request: ReverseRequest) -> Optional[LocationCtx]:
        """The location of ``request`` (:meth:`match`, cached per path where that is safe)."""
        cache = self._by_path
        if cache is None:
            return self.match(request.route_info())
        path = request.norm_path
        try:
            return cache[path]
        except KeyError:
            pass
        loc = self.match(request.route_info())
        if len(cache) >= ROUTE_CACHE:
            cache.clear()
        cache[path] = loc
        return loc


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

    def __init__(self, reactor: Any, vhosts: VirtualHosts[ServerCtx], limits: Limits, name: str,
                 http2: bool = False) -> None:
        super().__init__(resource.Resource(), reactor=reactor)
        self.clock = reactor
        self.vhosts = vhosts
        self.limits = limits
        self.name = name
        self.http2 = http2  # a TLS listener offering h2 by ALPN

    def buildProtocol(self, addr: Any) -> Any:
        if self.http2:
            return ALPNSwitch(self, lambda: HTTP11Channel(self, self.limits), self.clock)
        return HTTP11Channel(self, self.limits)

    def log(self, request: Any) -> None:
        """Called by ``Request.finish``: the access-log line."""
        request.log_once()

    def dispatch(self, request: ReverseRequest) -> None:
        """The pipeline of SPEC §4, from location match to handler."""
        loc = self.vhosts.pick(request.host_name).route(request)
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


class ReverseFeature(Feature):
    """Everything ``[http]`` needs at run time (see the module docstring)."""

    name = "reverse"

    def __init__(self, ctx: BuildContext, config: Config) -> None:
        super().__init__()
        http = config.http
        assert http is not None
        self.reactor = ctx.reactor
        self.http = http
        from .upstream import UpstreamPool

        self.pool = UpstreamPool(ctx.reactor)
        self.logs = AccessLogs(http.log_format, http.log_names)
        self._groups: dict[GroupSpec, UpstreamGroup] = {}
        self._tls_clients: dict[tuple[str, Optional[str], bool], Any] = {}
        self.sites: list[tuple[Address, bool, ReverseSite, Any, Optional[int]]] = []
        self.specs: list[ListenSpec] = []
        self.notes: list[str] = []  # warnings shown by --check and logged at start
        self.file_cache = FileCache()  # one per feature, shared by its file_server locations
        self.zones = build_zones(http.limit_req_zone, ctx.reactor,
                                 shared=ctx.fleet.shared_zone if ctx.fleet is not None else None)
        try:
            self._build(http)
        except (AccessLogError, TLSConfigError, ValueError) as e:
            self.logs.close()
            raise StartupError(str(e)) from None

    # -- building ------------------------------------------------------------------------
    def group(self, spec: GroupSpec, tls: Any = None) -> UpstreamGroup:
        """The one UpstreamGroup of ``spec`` (shared by every location naming it),
        with its active health checker (over TLS for https upstreams)."""
        g = self._groups.get(spec)
        if g is None:
            g = self._groups[spec] = UpstreamGroup(spec, self.reactor)
            self.upstreams.append(g)
            if spec.health_check is not None:
                probe = probe_for(self.reactor, spec.health_check, tls)
                self.services.append(HealthChecker(g, self.reactor, probe))
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
            http2 = any(s.config.http2 for s in servers)
            for s in servers:
                self.notes += check_http2(f"http.server[{s.index}]", s.config.http2, tls)
            site = ReverseSite(self.reactor, vhosts, limits, name, http2=http2 and tls)
            factory: Any = site
            if tls:
                pairs: list[tuple[str, str]] = []
                for s in servers:
                    pair = (s.config.cert, s.config.key)
                    if pair[0] and pair[1] and pair not in pairs:
                        pairs.append((pair[0], pair[1]))
                factory = TLSMemoryBIOFactory(server_creator(pairs, alpn=alpn_for(http2)), False, site)
                factory.noisy = False
            self.sites.append((addr, tls, site, factory, default.max_connections))
            names = ", ".join(s.config.up_name or "(no name)" for s in servers)
            self.specs.append(ListenSpec("tcp", addr, name, factory=factory, max_connections=default.max_connections,
                                         description=f"{name} on {addr}: {names}"))

    def _location(self, http: Http, srv: HttpServer, si: int, li: int, loc: Location) -> LocationCtx:
        where = f"http.server[{si}].location[{li}]"
        try:
            rule = compile_rule(loc.rule, http.match_names)
        except ValueError as e:
            raise ValueError(f"{where}.rule: {e}") from None
        try:
            access_log = self.logs.get(loc.access_log)
        except AccessLogError as e:
            raise ValueError(f"{where}.access_log: {e}") from None
        req_rules, resp_rules = split_rules(loc.headers or ())
        env = _Env(self, http, srv, loc, where)
        ctx = LocationCtx(where, loc, srv, rule, steps=build_steps(loc, env), request_rules=req_rules,
                          response_rules=resp_rules, access_log=access_log)
        ctx.handler = build_handler(loc, where, env)
        return ctx

    # -- running -------------------------------------------------------------------------
    def listeners(self) -> Iterable[ListenSpec]:
        return self.specs

    def plan_notes(self) -> list[str]:
        return list(self.notes)

    def start(self) -> None:
        for note in self.notes:
            _log.warn("{note}", note=note)
        super().start()

    def carry_state_from(self, old: IFeature) -> None:
        """Group health (by group name) and limit_req state (by zone name)."""
        super().carry_state_from(old)
        previous = getattr(old, "zones", {})
        for name, zone in self.zones.items():
            if name in previous:
                zone.carry_state_from(previous[name])

    def stop(self) -> None:
        """Health checks stop; idle upstream connections close (busy ones when released).

        The access logs stay open for the requests still running on this
        configuration (their files close when the feature is let go).
        """
        super().stop()
        self.pool.close()

    def reopen_logs(self) -> None:
        self.logs.reopen()

    def snapshot(self) -> dict[str, Any]:
        return {"pool": {"idle": sum(len(v) for v in self.pool.idle.values()),
                         "opened": self.pool.opened, "reused": self.pool.reused}}


class _Env:
    """What :func:`build_handler` may ask for while building one location."""

    def __init__(self, feature: ReverseFeature, http: Http, srv: HttpServer, loc: Location, where: str) -> None:
        self.feature = feature
        self.scopes = (loc.upstream, srv.upstream, http.upstream)
        self.where = where
        self.clock = feature.reactor
        self.file_cache = feature.file_cache
        self.zones = feature.zones

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


def build(ctx: BuildContext, config: Config) -> list[IFeature]:
    """``[http]`` with servers: one :class:`ReverseFeature` (raises StartupError with one line)."""
    if config.http is None or not config.http.server:
        return []
    return [ReverseFeature(ctx, config)]
