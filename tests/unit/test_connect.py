"""The connector on a memory reactor: literal addresses dial directly, failures are classified."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from wmproxy_tw.config.grammar import Address
from wmproxy_tw.connect import TargetPolicy, UpstreamError, connect, quiet_factory


class Recorder(Protocol):
    """Remembers what happened to it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)


def _results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_literal_ip_fires_after_connection_made_with_the_callers_protocol() -> None:
    """A literal IPv4 target is dialled with connectTCP; the Deferred fires with our own protocol once made."""
    reactor = MemoryReactorClock()
    proto = Recorder()
    out = _results(connect(reactor, "127.0.0.1", 8080, quiet_factory(lambda: proto), timeout=3))
    host, port, factory, timeout, _bind = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8080, 3)
    built = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert built is proto and out == []
    built.makeConnection(StringTransport())
    assert out == [proto] and proto.events == ["made"]
    built.dataReceived(b"x")  # no wrapper between the transport and the protocol
    assert proto.events == ["made", b"x"]


def test_literal_ipv6_is_dialled_directly() -> None:
    """An IPv6 literal goes to connectTCP as well (no name resolution)."""
    reactor = MemoryReactorClock()
    connect(reactor, "::1", 443, quiet_factory(Recorder))
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("::1", 443)]


def test_literal_timeout_is_504_and_refusal_502() -> None:
    """A connect timeout answers 504; a refused connection 502 naming the target."""
    reactor = MemoryReactorClock()
    timed = _results(connect(reactor, "127.0.0.1", 81, quiet_factory(Recorder)))
    refused = _results(connect(reactor, "::1", 82, quiet_factory(Recorder)))
    for (_h, _p, factory, *_), exc in zip(reactor.tcpClients, [error.TimeoutError(), error.ConnectionRefusedError()], strict=True):
        factory.clientConnectionFailed(reactor.connectors[0], Failure(exc))
    assert isinstance(timed[0].value, UpstreamError) and timed[0].value.status == 504
    assert isinstance(refused[0].value, UpstreamError) and refused[0].value.status == 502
    assert "refused by [::1]:82" in refused[0].value.reason


def test_cancel_stops_connecting_and_fails_with_502() -> None:
    """Cancelling the Deferred stops the connector and errbacks with an UpstreamError."""
    reactor = MemoryReactorClock()
    d = connect(reactor, "127.0.0.1", 80, quiet_factory(Recorder))
    out = _results(d)
    d.cancel()
    assert reactor.connectors[0].stoppedConnecting
    assert isinstance(out[0].value, UpstreamError) and out[0].value.status == 502


def test_factory_refusing_to_build_is_502() -> None:
    """A factory whose buildProtocol returns None fails the attempt instead of hanging."""
    reactor = MemoryReactorClock()
    f: Factory = Factory()
    f.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    out = _results(connect(reactor, "127.0.0.1", 80, f))
    assert reactor.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 80)) is None
    assert isinstance(out[0].value, UpstreamError) and out[0].value.status == 502


def test_denied_literal_is_refused_before_dialling() -> None:
    """A literal address the policy denies is refused with 403 and never dialled."""
    reactor = MemoryReactorClock()
    policy = TargetPolicy([Address("127.0.0.1", 8080)])
    out = _results(connect(reactor, "127.0.0.1", 8080, quiet_factory(Recorder), policy=policy))
    assert reactor.tcpClients == []
    assert isinstance(out[0].value, UpstreamError) and out[0].value.status == 403

