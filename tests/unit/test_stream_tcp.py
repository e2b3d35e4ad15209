"""Dialing a group and the TCP stream protocol on a memory reactor (no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from wmproxy_tw.balance.dial import Dialed, dial
from wmproxy_tw.balance.testing import FakeSelector
from wmproxy_tw.config import load_text
from wmproxy_tw.connect import UpstreamError
from wmproxy_tw.stream.tcp import StreamFactory


def succeed_connect(reactor: MemoryReactorClock, index: int = -1) -> tuple[Protocol, StringTransport]:
    """Complete the reactor's pending connectTCP number ``index``: returns (protocol, transport)."""
    host, port, factory, _timeout, _bind = reactor.tcpClients[index]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(transport)
    return proto, transport


def fail_connect(reactor: MemoryReactorClock, index: int = -1, exc: Exception | None = None) -> None:
    factory = reactor.tcpClients[index][2]
    connector = reactor.connectors[index]
    factory.clientConnectionFailed(connector, Failure(exc or error.ConnectionRefusedError()))


def test_dial_tries_the_next_member_and_reports_health() -> None:
    """A refused member is reported and un-counted; the next one is tried; success is reported."""
    reactor = MemoryReactorClock()
    group = FakeSelector([("10.0.0.1", 1), ("10.0.0.2", 2)])
    results: list[Any] = []
    dial(reactor, group, lambda m: Factory.forProtocol(Protocol), key="c").addBoth(results.append)
    assert reactor.tcpClients[0][:2] == ("10.0.0.1", 1)
    fail_connect(reactor, 0)
    assert reactor.tcpClients[1][:2] == ("10.0.0.2", 2)
    succeed_connect(reactor, 1)
    dialed = results[0]
    assert isinstance(dialed, Dialed) and dialed.member.addr == ("10.0.0.2", 2)
    names = [(e, m.addr if m else None) for e, m in group.events]
    assert names == [("select", ("10.0.0.1", 1)), ("connection_started", ("10.0.0.1", 1)),
                     ("report_failure", ("10.0.0.1", 1)), ("connection_finished", ("10.0.0.1", 1)),
                     ("select", ("10.0.0.2", 2)), ("connection_started", ("10.0.0.2", 2)),
                     ("report_success", ("10.0.0.2", 2))]
    dialed.release()
    dialed.release()
    assert group.events[-1][0] == "connection_finished" and group.members[1].active == 0


def test_dial_gives_502_or_504_when_no_member_is_left() -> None:
    """All members failing: the last error (502 refused, 504 timeout); an empty group: 502."""
    reactor = MemoryReactorClock()
    group = FakeSelector([("10.0.0.1", 1)])
    results: list[Any] = []
    dial(reactor, group, lambda m: Factory.forProtocol(Protocol)).addErrback(results.append)
    fail_connect(reactor, 0, error.TimeoutError())
    assert results[0].check(UpstreamError) and results[0].value.status == 504
    group.unusable = set(group.members)
    dial(reactor, group, lambda m: Factory.forProtocol(Protocol)).addErrback(results.append)
    assert results[1].value.status == 502 and "no usable member" in results[1].value.reason


def test_dial_cancel_uncounts_without_blame() -> None:
    """Cancelling a dial in flight stops the attempt, un-counts the member, reports nothing."""
    reactor = MemoryReactorClock()
    group = FakeSelector([("10.0.0.1", 1)])
    d = dial(reactor, group, lambda m: Factory.forProtocol(Protocol))
    d.addErrback(lambda f: None)
    d.cancel()
    assert [e for e, _m in group.events] == ["select", "connection_started", "connection_finished"]
    assert reactor.connectors[0].stoppedConnecting


def _stream(extra: str = "", members: tuple[tuple[str, int], ...] = (("10.0.0.1", 80),)) -> tuple[Any, Any, Any]:
    cfg = load_text(f'[[stream.server]]\nbind_addr = "127.0.0.1:83"\nproxy_url = "127.0.0.1:9"\n{extra}\n'
                    ).config.stream.server[0]  # type: ignore[union-attr]
    reactor = MemoryReactorClock()
    group = FakeSelector(members)
    factory = StreamFactory(reactor, cfg, group)
    return factory, reactor, group


def _client(factory: StreamFactory, host: str = "192.0.2.9") -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", host, 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 5555),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 83))
    proto.makeConnection(transport)
    return proto, transport


def test_client_paused_until_upstream_connects_then_spliced() -> None:
    """The client is paused while dialing; bytes read early are kept; then each is the other's producer."""
    factory, reactor, _group = _stream()
    proto, client = _client(factory)
    assert client.producerState == "paused"
    proto.dataReceived(b"early")
    up_proto, upstream = succeed_connect(reactor)
    assert upstream.value() == b"early" and client.producerState == "producing"
    assert client.producer is upstream and upstream.producer is client
    up_proto.dataReceived(b"answer")
    assert client.value() == b"answer"


def test_send_proxy_protocol_goes_first() -> None:
    """With send_proxy_protocol the upstream reads the PROXY header before any client byte."""
    factory, reactor, _group = _stream('send_proxy_protocol = "v1"')
    proto, _client_t = _client(factory)
    proto.dataReceived(b"hello")
    _up, upstream = succeed_connect(reactor)
    assert upstream.value() == b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 83\r\nhello"


def test_half_close_is_passed_on_and_connection_counted_once() -> None:
    """Client EOF half-closes the upstream; when both are gone the member is released once."""
    factory, reactor, group = _stream()
    proto, _client_t = _client(factory)
    up_proto, upstream = succeed_connect(reactor)
    upstream.loseWriteConnection = lambda: setattr(upstream, "half_closed", True)  # type: ignore[method-assign]
    proto.readConnectionLost()
    assert getattr(upstream, "half_closed", False)
    up_proto.connectionLost(Failure(error.ConnectionDone()))
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert [e for e, _m in group.events].count("connection_finished") == 1
    assert group.members[0].active == 0 and not factory.active


def test_connect_timeout_and_idle_timeout_use_the_clock() -> None:
    """proxy_connect_timeout bounds the connect; client_timeout closes an idle relay."""
    factory, reactor, _group = _stream('proxy_connect_timeout = "3s"\nclient_timeout = "20s"')
    assert reactor.tcpClients == []
    _proto, client = _client(factory)
    assert reactor.tcpClients[0][3] == 3
    _up, upstream = succeed_connect(reactor)
    reactor.advance(19)
    assert not client.disconnecting
    reactor.advance(2)
    assert client.disconnecting and upstream.disconnecting


def test_client_leaving_while_dialing_cancels_the_attempt() -> None:
    """A client that goes away during the connect cancels it; nothing is counted as a failure."""
    factory, reactor, group = _stream()
    proto, _client_t = _client(factory)
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert reactor.connectors[0].stoppedConnecting
    assert [e for e, _m in group.events] == ["select", "connection_started", "connection_finished"]


def test_allow_and_deny_ip() -> None:
    """Clients outside allow_ip or inside deny_ip are closed before anything is dialed."""
    factory, reactor, _group = _stream('allow_ip = "192.0.2.0/24"\ndeny_ip = "192.0.2.66"')
    for host, admitted in (("198.51.100.1", False), ("192.0.2.66", False), ("192.0.2.1", True)):
        _proto, transport = _client(factory, host)
        assert transport.disconnecting is not admitted
    assert len(reactor.tcpClients) == 1


def test_allow_ip_applies_to_the_client_named_by_a_trusted_proxy_header() -> None:
    """Behind a trusted PROXY front, allow_ip/deny_ip judge the header's client, not the front."""
    from wmproxy_tw.config.grammar import parse_ipset
    from wmproxy_tw.proxyproto import ProxyProtocolFactory

    factory, reactor, _group = _stream('deny_ip = "203.0.113.7"')
    wrapping = ProxyProtocolFactory(factory, parse_ipset("10.0.0.1"), reactor)
    for source, admitted in (("203.0.113.7", False), ("203.0.113.8", True)):
        proto = wrapping.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 4000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 83))
        proto.makeConnection(transport)
        proto.dataReceived(f"PROXY TCP4 {source} 127.0.0.1 5555 83\r\n".encode())
        assert transport.disconnecting is not admitted
    assert len(reactor.tcpClients) == 1


def test_client_dial_closes_a_connection_made_after_the_client_left() -> None:
    """ClientDial: a connection that completes once ``gone()`` is true is closed and un-counted."""
    from wmproxy_tw.balance.dial import ClientDial

    reactor = MemoryReactorClock()
    group = FakeSelector([("10.0.0.1", 1)])
    errors: list[UpstreamError] = []
    gone = [False]
    cd = ClientDial(reactor, group, lambda m: Factory.forProtocol(Protocol), key="c", timeout=5,
                    gone=lambda: gone[0], failed=errors.append)
    gone[0] = True
    _proto, transport = succeed_connect(reactor)
    assert transport.disconnecting and cd.dialing is None and not errors
    assert group.events[-1][0] == "connection_finished" and group.members[0].active == 0
    cd.release()  # idempotent with the close
    assert [e for e, _m in group.events].count("connection_finished") == 1


def test_client_dial_reports_an_unreachable_upstream_once() -> None:
    """ClientDial: a refused connect reaches ``failed`` as a 502 UpstreamError; cancel afterwards is a no-op."""
    from wmproxy_tw.balance.dial import ClientDial

    reactor = MemoryReactorClock()
    group = FakeSelector([("10.0.0.1", 1)])
    errors: list[UpstreamError] = []
    cd = ClientDial(reactor, group, lambda m: Factory.forProtocol(Protocol), key="c", timeout=5,
                    gone=lambda: False, failed=errors.append)
    fail_connect(reactor)
    assert [e.status for e in errors] == [502] and cd.dialing is None
    cd.cancel()
    assert len(errors) == 1
