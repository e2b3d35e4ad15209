"""What a capability gives the service: listeners, state, and a way to stop.

A *feature* is built from a configuration by its package's ``build(ctx,
config)`` function, which returns zero or more objects providing
:class:`IFeature`.  :class:`wmproxy_tw.service.ProxyService` does the rest
for every feature alike:

* binds the listeners it asks for (:class:`ListenSpec`), one socket per
  ``(kind, address)``, and on reload keeps, closes or opens sockets by
  comparing those keys;
* calls :meth:`IFeature.carry_state_from` with the feature of the same
  ``name`` in the previous configuration, then :meth:`IFeature.start`, and
  :meth:`IFeature.stop` on the old one (which must leave its open
  connections alone: they finish on the old objects);
* shows :meth:`IFeature.groups`, :meth:`IFeature.tunnel_clients` and
  :meth:`IFeature.snapshot` in ``/status`` and ``/metrics``;
* on a graceful stop, closes every listener, calls :meth:`IFeature.drain`,
  waits for the accepted connections (and the Deferred ``drain`` returned) up
  to ``shutdown_timeout``, then aborts what is left (:meth:`IFeature.abort`).

Building must have no side effects (no timers, no sockets, no reading of
the reactor): ``twistd wmproxy --check`` and a reload that fails build
features and throw them away.  Start timers and health checkers in
:meth:`IFeature.start`.

:class:`Feature` is a base class with the defaults; a new capability usually
overrides ``listeners`` and one or two hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import DatagramProtocol
from zope.interface import Attribute, Interface, implementer

from .config.grammar import Address
from .observe.stats import NULL_STATS, Stats

if TYPE_CHECKING:
    from .balance.selector import UpstreamGroup

__all__ = ["IFeature", "Feature", "ListenSpec", "BuildContext"]


@dataclass(frozen=True)
class ListenSpec:
    """A socket a feature wants: ``(kind, addr)`` is its identity across reloads."""

    kind: str  # "tcp" | "udp"
    addr: Address
    name: str  # shown in logs, /status and start-up errors: "forward proxy"
    factory: Optional[IProtocolFactory] = None  # tcp: builds one protocol per connection
    protocol: Optional[DatagramProtocol] = None  # udp: receives every datagram
    max_connections: Optional[int] = None
    description: str = ""  # the --check line; "NAME on ADDR" when empty
    #: On a graceful stop, wait for this listener's connections to finish (False:
    #: close them at once, as the control API does).
    drain: bool = True

    @property
    def key(self) -> tuple[str, Address]:
        return (self.kind, self.addr)

    def describe(self) -> str:
        where = f"udp {self.addr}" if self.kind == "udp" else str(self.addr)
        return self.description or f"{self.name} on {where}"


@dataclass
class BuildContext:
    """What a feature may use: given by the service, never imported globally.

    ``reactor`` is None while only planning (``--check``, a reload being
    validated): a feature must not touch it before :meth:`IFeature.start`.
    """

    reactor: Any
    stats: Stats = field(default_factory=lambda: NULL_STATS)
    #: The running service's controller (reload), None while planning.
    controller: Any = None
    #: The fleet feature (wmproxy_tw.fleet), set by its builder (first in BUILDERS) when
    #: ``[fleet]`` is present: features built after it reach Redis through it.
    fleet: Any = None


class IFeature(Interface):
    """One capability built from one configuration (see the module docstring)."""

    name = Attribute("Unique within a configuration; state carries over between features of the same name.")

    def listeners() -> Iterable[ListenSpec]:
        """The sockets to listen on."""

    def start() -> None:
        """Start background work (health checks, timers): the feature is live."""

    def stop() -> None:
        """Stop background work; open connections are left to finish."""

    def carry_state_from(old: "IFeature") -> None:
        """Take over state (health, rate-limit zones) from the feature being replaced."""

    def groups() -> Iterable["UpstreamGroup"]:
        """Upstream groups whose health is shown in /status and /metrics."""

    def tunnel_clients() -> list[dict[str, Any]]:
        """Connected tunnel clients (JSON-able dicts) for /status."""

    def snapshot() -> dict[str, Any]:
        """Feature-specific state for /status (JSON-able)."""

    def drain() -> Optional[Deferred[Any]]:
        """Graceful stop began: finish in-flight work, take no new requests.

        Accepted connections are waited for by the service; return a Deferred
        only for work it cannot see (outbound connections such as a tunnel
        client's).
        """

    def abort() -> None:
        """``shutdown_timeout`` passed: abort whatever :meth:`drain` waits for."""

    def reopen_logs() -> None:
        """SIGUSR1: reopen log files (after logrotate moved them)."""


@implementer(IFeature)
class Feature:
    """Defaults for :class:`IFeature`: no listeners, no state, nothing to drain.

    ``services`` (e.g. :class:`~wmproxy_tw.balance.HealthChecker`) are started
    by :meth:`start` and stopped by :meth:`stop`; ``upstreams`` are shown in
    /status and their health carries over by group name on reload.
    """

    name = "feature"

    def __init__(self) -> None:
        self.services: list[IService] = []
        self.upstreams: list[UpstreamGroup] = []

    def listeners(self) -> Iterable[ListenSpec]:
        return ()

    def start(self) -> None:
        for s in self.services:
            s.startService()

    def stop(self) -> None:
        for s in self.services:
            if s.running:
                s.stopService()

    def carry_state_from(self, old: IFeature) -> None:
        previous = {g.name: g for g in old.groups()}
        for group in self.groups():
            if group.name in previous:
                group.carry_state_from(previous[group.name])

    def groups(self) -> Iterable[UpstreamGroup]:
        return self.upstreams

    def tunnel_clients(self) -> list[dict[str, Any]]:
        return []

    def snapshot(self) -> dict[str, Any]:
        return {}

    def drain(self) -> Optional[Deferred[Any]]:
        return None

    def abort(self) -> None:
        pass

    def reopen_logs(self) -> None:
        pass
