"""The UDP session table on a fake reactor: sessions, replies, LRU and idle eviction, ICMP errors."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from wmproxy_tw.balance import GroupSpec, MemberSpec, UpstreamGroup
from wmproxy_tw.balance.testing import FakeSelector
from wmproxy_tw.config import load_text
from wmproxy_tw.stream.udp import MAX_DATAGRAM, UdpRelay


class FakeUdpPort:
    """A listening UDP port of the fake reactor: records what is written and where it connected."""

    def __init__(self, reactor: FakeReactor, proto: Any, interface: str, max_packet: int) -> None:
        self.reactor = reactor
        self.proto = proto
        self.interface = interface
        self.max_packet = max_packet
        self.connected_to: tuple[str, int] | None = None
        self.written: list[tuple[bytes, Any]] = []
        self.stopped = False
        proto.transport = self

    def connect(self, host: str, port: int) -> None:
        self.connected_to = (host, port)

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))

    def stopListening(self) -> None:
        self.stopped = True

    def getHost(self) -> Any:
        return None


class FakeReactor(Clock):
    """A Clock that can listen on UDP and resolve names (the seams UdpRelay uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeUdpPort] = []
        self.resolving: dict[str, Deferred[str]] = {}

    def listenUDP(self, port: int, proto: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUdpPort:
        p = FakeUdpPort(self, proto, interface, maxPacketSize)
        self.ports.append(p)
        return p

    def resolve(self, name: str) -> Deferred[str]:
        if name == "localhost":
            return succeed("127.0.0.1")
        d: Deferred[str] = Deferred()
        self.resolving[name] = d
        return d


def _relay(extra: str = "", members: tuple[str, ...] = ("10.0.0.1:53",)) -> tuple[UdpRelay, FakeReactor, Any]:
    cfg = load_text(f'[[stream.server]]\nbind_addr = "127.0.0.1:5300"\nbind_mode = "udp"\n'
                    f'proxy_url = "127.0.0.1:9"\n{extra}\n').config.stream.server[0]  # type: ignore[union-attr]
    reactor = FakeReactor()
    addrs = [(m.rsplit(":", 1)[0], int(m.rsplit(":", 1)[1])) for m in members]
    group = FakeSelector(addrs)
    relay = UdpRelay(reactor, cfg, group)
    listening = FakeUdpPort(reactor, relay, "127.0.0.1", MAX_DATAGRAM)
    relay.startProtocol()
    return relay, reactor, listening


def test_each_client_gets_its_own_connected_socket() -> None:
    """Two clients → two upstream sockets, each connected to the member, 64 KiB datagrams allowed."""
    relay, reactor, _listening = _relay()
    relay.datagramReceived(b"a1", ("192.0.2.1", 1000))
    relay.datagramReceived(b"b1", ("192.0.2.2", 2000))
    relay.datagramReceived(b"a2", ("192.0.2.1", 1000))
    assert len(relay.sessions) == 2
    a, b = reactor.ports
    assert a.connected_to == ("10.0.0.1", 53) and a.interface == "0.0.0.0" and a.max_packet == 65535
    assert [d for d, _ in a.written] == [b"a1", b"a2"] and [d for d, _ in b.written] == [b"b1"]


def test_replies_leave_from_the_listening_socket_to_the_right_client() -> None:
    """A reply on a session socket is sent by the listening socket to that session's client."""
    relay, _reactor, listening = _relay()
    relay.datagramReceived(b"q", ("192.0.2.1", 1000))
    relay.datagramReceived(b"q", ("2001:db8::5", 3000))
    s1, s2 = relay.sessions.values()
    big = b"x" * 65507
    s1.datagramReceived(big, ("10.0.0.1", 53))
    s2.datagramReceived(b"r2", ("10.0.0.1", 53))
    assert listening.written == [(big, ("192.0.2.1", 1000)), (b"r2", ("2001:db8::5", 3000))]


def test_table_is_bounded_least_recently_used_goes() -> None:
    """Past max_udp_sessions the least recently used session is closed and un-counted."""
    relay, reactor, _l = _relay("max_udp_sessions = 2")
    relay.datagramReceived(b"1", ("192.0.2.1", 1))
    relay.datagramReceived(b"2", ("192.0.2.2", 2))
    relay.datagramReceived(b"1 again", ("192.0.2.1", 1))  # 2 is now the least recently used
    relay.datagramReceived(b"3", ("192.0.2.3", 3))
    assert list(relay.sessions) == [("192.0.2.1", 1), ("192.0.2.3", 3)]
    assert reactor.ports[1].stopped and relay.evicted == 1
    member = relay.group.members[0]
    assert member.active == 2


def test_idle_sessions_close_after_client_timeout() -> None:
    """A session idle for client_timeout (alias timeout) closes; traffic in either direction keeps it."""
    relay, reactor, _l = _relay('timeout = "10s"')
    relay.datagramReceived(b"a", ("192.0.2.1", 1))
    relay.datagramReceived(b"b", ("192.0.2.2", 2))
    reactor.advance(6)
    relay.sessions[("192.0.2.1", 1)].datagramReceived(b"reply", ("10.0.0.1", 53))
    reactor.advance(5)
    assert list(relay.sessions) == [("192.0.2.1", 1)]
    reactor.advance(10)
    assert not relay.sessions and all(p.stopped for p in reactor.ports)
    assert not reactor.getDelayedCalls()


def test_icmp_refused_reports_failure_and_ends_the_session() -> None:
    """connectionRefused on a session counts a failure for passive health and frees the session."""
    relay, _reactor, _l = _relay(members=("10.0.0.1:53", "10.0.0.2:53"))
    relay.datagramReceived(b"a", ("192.0.2.1", 1))
    session = relay.sessions[("192.0.2.1", 1)]
    session.connectionRefused()
    events = [(e, m.addr if m else None) for e, m in relay.group.events]
    assert ("report_failure", ("10.0.0.1", 53)) in events
    assert ("connection_finished", ("10.0.0.1", 53)) in events
    assert not relay.sessions


def test_names_resolve_without_blocking_and_datagrams_wait_bounded() -> None:
    """A member given by name is resolved; datagrams wait (at most 16) and are then sent in order."""
    relay, reactor, _l = _relay(members=("dns.internal:53",))
    for i in range(20):
        relay.datagramReceived(b"%d" % i, ("192.0.2.1", 1))
    assert reactor.ports[1:] == []  # nothing opened yet
    reactor.resolving["dns.internal"].callback("10.9.9.9")
    port = reactor.ports[0]
    assert port.connected_to == ("10.9.9.9", 53)
    assert [d for d, _ in port.written] == [b"%d" % i for i in range(16)]
    assert relay.dropped == 4


def test_no_usable_member_drops_and_real_group_counts() -> None:
    """With the only member down, datagrams are dropped; with a real group the counts balance."""
    relay, reactor, _listening = _relay()
    relay.group.unusable = set(relay.group.members)
    relay.datagramReceived(b"x", ("192.0.2.1", 1))
    assert relay.dropped == 1 and not relay.sessions
    group = UpstreamGroup(GroupSpec("g", (MemberSpec("10.0.0.1", 53),)), reactor)
    relay.group = group
    relay.datagramReceived(b"x", ("192.0.2.1", 1))
    assert group.members[0].active == 1
    relay.stop()
    assert group.members[0].active == 0 and not relay.sessions
