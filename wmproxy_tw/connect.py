"""The one connector: open an upstream TCP connection, classify failures.

``HostnameEndpoint`` resolves names without blocking the reactor (getaddrinfo
in the thread pool) and races IPv4/IPv6 (happy eyeballs).  Failures are mapped
to the status a proxy owes its client: 502 for "cannot reach", 504 for
"took too long".
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint, ITCPTransport
from twisted.protocols.policies import WrappingFactory
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from .config.grammar import Address

__all__ = ["UpstreamError", "classify", "connect", "endpoint_for", "quiet_factory", "TargetPolicy"]


@dataclass
class UpstreamError(Exception):
    """Why an upstream could not be reached, with the status to answer."""

    status: int  # 502 or 504 (403 for a denied target)
    reason: str

    def __str__(self) -> str:
        return self.reason

    @classmethod
    def of(cls, failure: Failure) -> UpstreamError:
        """The error a failed attempt carries (a 502 naming any other exception)."""
        exc = failure.value
        return exc if isinstance(exc, UpstreamError) else cls(502, str(exc))


def classify(failure: Failure, target: str) -> UpstreamError:
    """Turn a connect failure into the 502/504 a client should get."""
    exc = failure.value
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (error.TimeoutError, error.UserError)) and "timeout" in str(exc).lower():
        return UpstreamError(504, f"timed out connecting to {target}")
    if isinstance(exc, error.TimeoutError):
        return UpstreamError(504, f"timed out connecting to {target}")
    if isinstance(exc, error.DNSLookupError):
        return UpstreamError(502, f"cannot resolve {target}")
    if isinstance(exc, error.ConnectionRefusedError):
        return UpstreamError(502, f"connection refused by {target}")
    if isinstance(exc, error.ConnectError):
        return UpstreamError(502, f"cannot connect to {target}: {exc.osError or exc.__class__.__name__}")
    return UpstreamError(502, f"cannot connect to {target}: {exc}")


@functools.lru_cache(maxsize=1024)
def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``host`` spells (scope id ignored), None for a name; cached."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def endpoint_for(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A client endpoint: literal IPs connect directly, names resolve async."""
    ip = _literal(host)
    if ip is None:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class TargetPolicy:
    """Which upstream addresses a forward proxy may connect to (loop guard)."""

    def __init__(self, denied: Iterable[Address] = ()) -> None:
        self.denied = set()
        for a in denied:
            ips = {a.host}
            if a.host in ("0.0.0.0", "::"):
                ips = {"*"}
            for ip in ips:
                self.denied.add((ip, a.port))
        self.ports = {port for _ip, port in self.denied}

    def allows(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return True
        ip = _literal(host)
        text = str(ip) if ip is not None else host.lower()
        if (text, port) in self.denied:
            return False
        if ("*", port) in self.denied and (ip is None and text == "localhost" or ip is not None and (ip.is_loopback or ip.is_unspecified)):
            return False
        return True


def quiet_factory(build: Callable[[], Protocol]) -> Factory:
    """A client factory that does not log "Starting factory" on every connection."""
    f: Factory = Factory.forProtocol(build)
    f.noisy = False
    return f


def connect(
    reactor: Any,
    host: str,
    port: int,
    factory: IProtocolFactory,
    timeout: float = 10.0,
    policy: TargetPolicy | None = None,
) -> "Deferred[Protocol]":
    """Connect to ``host:port``; errback with :class:`UpstreamError`.

    The policy is checked on the name before connecting and on the peer
    address after (so a name that resolves to a denied address is refused).
    """
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if policy is not None and not policy.allows(host, port):
        d: Deferred[Protocol] = Deferred()
        d.errback(UpstreamError(403, f"target {target} is not allowed"))
        return d
    if _literal(host) is not None and not isinstance(factory, WrappingFactory):
        # The policy has seen the address itself: no name, no check after.
        # (Wrapping factories such as TLS call connectionMade in their own order: endpoint path.)
        dial = _Dial(factory, target)
        reactor.connectTCP(host, port, dial, timeout=timeout)
        return dial.d
    d = endpoint_for(reactor, host, port, timeout).connect(factory)  # type: ignore[assignment]

    def check_peer(proto: Protocol) -> Protocol:
        if policy is not None and proto.transport is not None:
            peer = proto.transport.getPeer()
            if not policy.allows(getattr(peer, "host", ""), getattr(peer, "port", 0)):
                proto.transport.abortConnection()  # type: ignore[attr-defined]
                raise UpstreamError(403, f"target {target} is not allowed")
        return proto

    d.addCallback(check_peer)
    d.addErrback(lambda f: Failure(classify(f, target)))
    return d


class _Dial(ClientFactory):
    """One ``connectTCP`` to a literal address, reported through :attr:`d`.

    What ``TCP4ClientEndpoint``/``TCP6ClientEndpoint`` do, minus their wrapping
    protocol: the transport talks to the caller's protocol directly (one call
    less per event, and no Deferred chain per connection).
    """

    noisy = False

    def __init__(self, factory: IProtocolFactory, target: str) -> None:
        self.factory = factory
        self.target = target
        self.d: Deferred[Protocol] = Deferred(canceller=self._cancel)
        self.connector: Any = None

    def startedConnecting(self, connector: Any) -> None:
        self.connector = connector

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        try:
            proto = self.factory.buildProtocol(addr)
            if proto is None:
                raise error.NoProtocol()
        except BaseException:
            self.d.errback(classify(Failure(), self.target))
            return None
        d = self.d
        made = proto.connectionMade

        def connection_made() -> None:
            made()
            if not d.called:
                d.callback(proto)  # type: ignore[arg-type]
            else:
                # the caller gave up (cancelled / timed out) before we connected
                transport = getattr(proto, "transport", None)  # not in IProtocol: a Protocol's
                if ITCPTransport.providedBy(transport):
                    transport.abortConnection()

        proto.connectionMade = connection_made  # type: ignore[method-assign]
        return proto  # type: ignore[return-value]

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.d.called:
            self.d.errback(classify(reason, self.target))

    def _cancel(self, d: Deferred[Protocol]) -> None:
        d.errback(classify(Failure(error.ConnectingCancelledError(self.connector.getDestination())), self.target))
        self.connector.stopConnecting()


def _quiet_endpoints() -> None:
    """Endpoints wrap our factory in one that logs every connection at info."""
    from twisted.internet import endpoints

    wrapping = getattr(endpoints, "_WrappingFactory", None)
    if wrapping is not None:
        wrapping.noisy = False


_quiet_endpoints()
