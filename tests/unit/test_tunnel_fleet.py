"""Fleet tunnels without Redis or sockets: directory claims and leases, the inter-node link's checks."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from wmproxy_tw.config.model import Proxy
from wmproxy_tw.tunnel.directory import Claim, ITunnelDirectory, MemoryDirectory, MemoryTable, lookup_keys
from wmproxy_tw.tunnel.fleet import FleetTunnels, LinkServerConnection, route_keys
from wmproxy_tw.tunnel.frames import AuthFailed, FrameDecoder, HelloOk, Refuse, Reset, ResetCode, encode_all
from wmproxy_tw.tunnel.server import Route
from wmproxy_tw.tunnel.session import Multiplexer

pytestmark = pytest.mark.timeout(10)


def result(d):  # noqa: ANN001, ANN201
    out = []
    d.addBoth(out.append)
    assert out, "the in-memory directory answers at once"
    return out[0]


def nodes(clock: Clock, *names: str) -> list[MemoryDirectory]:
    table = MemoryTable()
    return [MemoryDirectory(table, n, f"127.0.0.1:{9000 + i}", clock, lease=3.0) for i, n in enumerate(names)]


def test_memory_directory_provides_the_interface() -> None:
    """MemoryDirectory implements ITunnelDirectory."""
    (a,) = nodes(Clock(), "a")
    assert verifyObject(ITunnelDirectory, a)


def test_lookup_keys_exact_then_wildcard_suffixes() -> None:
    """A host matches itself first, then ever shorter *. suffixes."""
    assert lookup_keys("a.b.example.com") == ["a.b.example.com", "*.b.example.com", "*.example.com", "*.com"]
    assert lookup_keys("localhost") == ["localhost"]


def test_claims_of_two_nodes_and_release() -> None:
    """Two nodes claim one domain: both are listed (sorted); a release leaves the other."""
    clock = Clock()
    a, b = nodes(clock, "a", "b")
    result(a.claim("http", "w.test"))
    result(b.claim("http", "w.test"))
    assert result(a.lookup("http", ["w.test"])) == [Claim("a", "127.0.0.1:9000"), Claim("b", "127.0.0.1:9001")]
    result(b.release("http", "w.test"))
    assert result(a.lookup("http", ["w.test"])) == [Claim("a", "127.0.0.1:9000")]
    assert result(a.lookup("https", ["w.test"])) == []


def test_a_claim_lapses_after_its_lease_unless_renewed() -> None:
    """Renewal keeps a claim; a node that stops renewing disappears within the lease."""
    clock = Clock()
    a, b = nodes(clock, "a", "b")
    result(a.claim("tcp", ""))
    result(b.claim("tcp", ""))
    for _ in range(4):
        clock.advance(1.0)
        result(a.renew())  # b is dead: it renews nothing
    assert result(a.lookup("tcp", [""])) == [Claim("a", "127.0.0.1:9000")]
    clock.advance(3.0)
    assert result(b.lookup("tcp", [""])) == []


def test_wildcard_claim_found_by_a_subdomain_after_an_exact_miss() -> None:
    """A *.example.com claim answers x.example.com; an exact claim wins over it."""
    clock = Clock()
    a, b = nodes(clock, "a", "b")
    result(a.claim("http", "*.example.com"))
    assert result(b.lookup("http", lookup_keys("x.example.com"))) == [Claim("a", "127.0.0.1:9000")]
    result(b.claim("http", "x.example.com"))
    assert result(a.lookup("http", lookup_keys("x.example.com"))) == [Claim("b", "127.0.0.1:9001")]
    result(a.release_all())
    assert result(b.lookup("http", lookup_keys("y.example.com"))) == []


def test_route_keys_per_mode() -> None:
    """http/https routes claim their domains, default tcp/proxy routes "", remote_port routes nothing."""
    conn = object()
    assert route_keys(Route(conn, "w", "http", ("a.test", "*.b.test"))) == ["a.test", "*.b.test"]  # type: ignore[arg-type]
    assert route_keys(Route(conn, "t", "tcp")) == [""]  # type: ignore[arg-type]
    assert route_keys(Route(conn, "p", "tcp", remote_port=2222)) == []  # type: ignore[arg-type]


# ------------------------------------------------------------------ the link, without sockets


class _Server:
    """What a link needs of a TunnelServer: settings, a clock, the public modes, no local route."""

    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.cfg = Proxy()
        self.public_modes = {"tcp"}

    def open_default(self, mode: str, peer: object) -> None:
        return None


def _link(secret: str, given: str):  # noqa: ANN202
    clock = Clock()
    (directory,) = nodes(clock, "b")
    fleet = FleetTunnels(_Server(clock), directory, secret)  # type: ignore[arg-type]
    conn = LinkServerConnection(fleet)
    transport = StringTransport()
    conn.makeConnection(transport)
    peer = Multiplexer(True)
    conn.dataReceived(encode_all(peer.hello(client="a", token=given)))
    replies = FrameDecoder().feed(transport.value())
    transport.clear()
    return conn, peer, transport, replies, clock


def test_link_refuses_a_wrong_secret() -> None:
    """HELLO with another secret: AUTH_FAILED and the link closes; nothing else is accepted."""
    conn, _peer, transport, replies, _clock = _link("s" * 20, "t" * 20)
    assert [type(f) for f in replies] == [AuthFailed]
    assert transport.disconnecting


def test_link_refuses_registrations_and_resets_unserved_services() -> None:
    """A good secret opens the link; REGISTER is refused; a service without a local route is reset."""
    conn, peer, transport, replies, _clock = _link("s" * 20, "s" * 20)
    assert [type(f) for f in replies] == [HelloOk]
    for f in replies:
        peer.receive_frame(f)
    frames = peer.register("web", "http", ("w.test",))
    _sid, opened = peer.open_stream("@fleet-tcp")
    _sid2, other = peer.open_stream("@fleet-http")  # no map_http_bind on this node
    conn.dataReceived(encode_all(frames + opened + other))
    out = FrameDecoder().feed(transport.value())
    assert any(isinstance(f, Refuse) and "no mappings" in f.reason for f in out)
    resets = [f for f in out if isinstance(f, Reset)]
    assert [r.code for r in resets] == [ResetCode.UNKNOWN_MAPPING] * 2
    assert not transport.disconnecting


def test_a_found_holder_is_remembered_for_the_cache_ttl_only() -> None:
    """Two requests within cache_ttl: one directory lookup; after it, or when no holder is reachable, ask again."""
    from twisted.internet.defer import fail, succeed

    clock = Clock()
    a, b = nodes(clock, "a", "b")
    result(b.claim("http", "w.test"))
    asked: list[str] = []
    lookup = a.lookup
    a.lookup = lambda mode, keys: (asked.append(keys[0]), lookup(mode, keys))[1]  # type: ignore[method-assign]
    fleet = FleetTunnels(_Server(clock), a, "s" * 20, cache_ttl=1.0)  # type: ignore[arg-type]

    class Link:
        claim = Claim("b", "127.0.0.1:9001")
        mux = type("M", (), {"is_open": True})()

    link = Link()
    fleet.pool.get = lambda claim: succeed(link)  # type: ignore[method-assign, assignment]
    first, second = result(fleet.find("http", "w.test")), result(fleet.find("http", "w.test"))
    assert first is second and first.owner == "fleet node 'b'"  # one RemoteRoute per (node, mode)
    assert asked == ["w.test"]
    clock.advance(1.5)
    result(fleet.find("http", "w.test"))
    assert asked == ["w.test", "w.test"]
    fleet.pool.get = lambda claim: fail(ConnectionError("refused"))  # type: ignore[method-assign, assignment]
    assert result(fleet.find("http", "w.test")) is None
    assert result(fleet.find("http", "w.test")) is None
    assert len(asked) == 3  # the unreachable answer was forgotten at once
