"""stream capability: ``[[stream.server]]`` listeners (SPEC §6, and §7's tcp2ws/ws2tcp).

:func:`describe` checks a ``[stream]`` section and says what would listen
where (``--check`` and start-up use it before binding anything);
:func:`build` makes the :class:`StreamFeature` (an IFeature) asking for them.

Every server resolves its target once: ``up_name`` naming a
``[[stream.upstream]]`` group, else ``proxy_url`` (a group name or a literal
``host:port``, see :func:`wmproxy_tw.balance.build.resolve_target`).  Servers
naming the same group share one :class:`~wmproxy_tw.balance.UpstreamGroup`
(one health state); a group with ``health_check`` is probed by TCP connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..balance import HealthChecker, UpstreamGroup, tcp_probe
from ..balance.build import Target, find_group, resolve_target
from ..balance.model import GroupSpec
from ..config.model import Config, Stream, StreamServer
from ..feature import BuildContext, Feature, IFeature, ListenSpec
from ..listen import StartupError
from ..proxyproto import ProxyProtocolFactory
from ..tls import TLSConfigError, client_creator

__all__ = ["ServerPlan", "StreamFeature", "build", "describe", "resolve"]

WS_CLIENT_MODES = ("tcp2ws", "tcp2wss")


@dataclass(frozen=True)
class ServerPlan:
    """One ``[[stream.server]]`` with its target resolved."""

    index: int
    cfg: StreamServer
    group: GroupSpec
    target: Target | None

    @property
    def where(self) -> str:
        return f"stream.server[{self.index}]"

    @property
    def mode(self) -> str:
        return self.cfg.bind_mode

    def ws_url(self) -> Any:
        from ..websocket.tcp2ws import ws_url

        target = self.target or Target("ws", self.group, "/", self.group.name, True)
        return ws_url(target, self.cfg.domain, force_tls=self.mode == "tcp2wss")

    def describe(self) -> str:
        members = ", ".join(m.addr_str for m in self.group.members)
        if self.mode in WS_CLIENT_MODES:
            dest = f"{self.ws_url()} (via {members})"
        elif self.target is not None and not self.target.named_group:
            dest = members
        else:
            dest = f"upstream {self.group.name} ({members})"
        extras = []
        if self.cfg.accept_proxy_protocol:
            extras.append("accepts PROXY")
        if self.cfg.send_proxy_protocol:
            extras.append(f"sends PROXY {self.cfg.send_proxy_protocol}")
        addrs = " ".join(str(a) for a in self.cfg.bind_addr)
        return f"stream {self.mode} on {addrs} → {dest}" + (f" ({', '.join(extras)})" if extras else "")


def resolve(stream: Stream) -> list[ServerPlan]:
    """Resolve every server's target; raise :class:`StartupError` naming the key."""
    plans = []
    scopes = [stream.upstream]
    for i, s in enumerate(stream.server):
        where = f"stream.server[{i}]"
        group = find_group(s.up_name, scopes)
        target = None
        if s.proxy_url:
            default = "ws" if s.bind_mode in WS_CLIENT_MODES else "tcp"
            try:
                target = resolve_target(s.proxy_url, scopes, default_scheme=default)
            except ValueError as e:
                raise StartupError(f"{where}.proxy_url: {e}") from None
            want = ("ws", "wss") if s.bind_mode in WS_CLIENT_MODES else ("tcp",)
            if target.scheme not in want:
                raise StartupError(f"{where}.proxy_url: bind_mode {s.bind_mode} needs "
                                   f"{' or '.join(w + '://' for w in want)}..., found {s.proxy_url!r}")
        if group is None:
            if target is None:
                raise StartupError(f"{where}.up_name: no [[stream.upstream]] named {s.up_name!r} "
                                   "(and no proxy_url)")
            group = target.group
        if s.accept_proxy_protocol:
            if s.bind_mode == "udp":
                raise StartupError(f"{where}.accept_proxy_protocol: not supported for bind_mode udp")
            if not s.proxy_protocol_from:
                raise StartupError(f"{where}.accept_proxy_protocol needs proxy_protocol_from: "
                                   "the addresses of the fronts allowed to send a PROXY header")
        if s.send_proxy_protocol and s.bind_mode not in ("tcp", "ws2tcp"):
            raise StartupError(f"{where}.send_proxy_protocol: only for bind_mode tcp and ws2tcp")
        plans.append(ServerPlan(i, s, group, target))
    return plans


def describe(stream: Stream | None) -> list[str]:
    """The listener lines of ``--check`` (resolving everything, binding nothing)."""
    if stream is None:
        return []
    return [p.describe() for p in resolve(stream)]


class StreamFeature(Feature):
    """Every ``[[stream.server]]`` of one configuration, and the groups and health checks they use."""

    name = "stream"

    def __init__(self, ctx: BuildContext, stream: Stream) -> None:
        super().__init__()
        self.reactor = ctx.reactor
        self.stream = stream
        self.plans = resolve(stream)
        self._groups: dict[GroupSpec, UpstreamGroup] = {}
        self.relays: list[Any] = []
        self.factories: list[Any] = []
        self.specs: list[ListenSpec] = []
        for plan in self.plans:
            cfg = plan.cfg
            name = f"{plan.where} ({plan.mode})"
            if plan.mode == "udp":
                from .udp import UdpRelay

                for addr in cfg.bind_addr:
                    relay = UdpRelay(self.reactor, cfg, self.group(plan.group))
                    self.relays.append(relay)
                    self.specs.append(ListenSpec("udp", addr, name, protocol=relay, description=plan.describe()))
                continue
            factory = self._factory(plan)
            self.factories.append(factory)
            if cfg.accept_proxy_protocol:
                factory = ProxyProtocolFactory(factory, cfg.proxy_protocol_from, self.reactor)
            for addr in cfg.bind_addr:
                self.specs.append(ListenSpec("tcp", addr, name, factory=factory, max_connections=cfg.max_connections,
                                             description=plan.describe()))

    def group(self, spec: GroupSpec) -> UpstreamGroup:
        """One selector per group spec, shared by the servers that use it."""
        group = self._groups.get(spec)
        if group is None:
            group = self._groups[spec] = UpstreamGroup(spec, self.reactor)
            self.upstreams.append(group)
            if spec.health_check is not None:
                self.services.append(HealthChecker(group, self.reactor, tcp_probe(self.reactor)))
        return group

    def listeners(self) -> Iterable[ListenSpec]:
        return self.specs

    def _factory(self, plan: ServerPlan) -> Any:
        group = self.group(plan.group)
        cfg = plan.cfg
        if plan.mode == "tcp":
            from .tcp import StreamFactory

            return StreamFactory(self.reactor, cfg, group)
        if plan.mode == "ws2tcp":
            from ..websocket.ws2tcp import Ws2TcpFactory

            return Ws2TcpFactory(self.reactor, cfg, group)
        from ..websocket.tcp2ws import Tcp2WsFactory

        url = plan.ws_url()
        tls = None
        if url.secure:
            try:
                tls = client_creator(url.tls_name, ca_path=cfg.proxy_ssl_ca, verify=cfg.proxy_ssl_verify)
            except TLSConfigError as e:
                raise StartupError(f"{plan.where}: {e}") from None
        return Tcp2WsFactory(self.reactor, cfg, group, url, tls)

    def abort(self) -> None:
        for relay in self.relays:
            relay.stop()


def build(ctx: BuildContext, config: Config) -> list[IFeature]:
    """``[[stream.server]]``: one feature serving every stream server."""
    if config.stream is None or not config.stream.server:
        return []
    return [StreamFeature(ctx, config.stream)]
