"""[stream] TCP and UDP forwarding on real loopback sockets (SPEC §6)."""

from __future__ import annotations

import json
import socket
import textwrap
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import implementer

from ..helpers import bound_port, deferLater, run_python, start_proxy

pytestmark = pytest.mark.integration


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(protocol.Protocol):
    """Echoes, and answers EOF with EOF (so a client can read everything back)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


def echo(interface: str = "127.0.0.1") -> Any:
    f = protocol.Factory.forProtocol(HalfCloseEcho)
    f.noisy = False
    return reactor.listenTCP(0, f, interface=interface)


class Capture(protocol.Protocol):
    """Records everything it reads; answers 'ok' to each read."""

    def connectionMade(self) -> None:
        self.factory.seen.append(self)
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.factory.arrived.callback(None) if not self.factory.arrived.called else None


def capture_server() -> tuple[Any, protocol.Factory]:
    f = protocol.Factory.forProtocol(Capture)
    f.noisy = False
    f.seen = []  # type: ignore[attr-defined]
    f.arrived = defer.Deferred()  # type: ignore[attr-defined]
    return reactor.listenTCP(0, f, interface="127.0.0.1"), f


async def _stop(*things: Any) -> None:
    for t in things:
        stop = getattr(t, "stopService", None) or t.stopListening
        await defer.maybeDeferred(stop)


def stream_conf(server: str, upstreams: str = "") -> str:
    return f"[stream]\n{upstreams}\n[[stream.server]]\nbind_addr = \"127.0.0.1:0\"\n{server}\n"


ROUND_TRIP = textwrap.dedent("""
    # argv: port n [6] [noshut]: send n bytes while reading the echo; compare digests.
    # With "noshut" the client stops once it has n bytes back (for relays without half-close);
    # otherwise it half-closes after sending and reads until the peer's EOF.
    import socket, sys, hashlib, selectors
    port, n = int(sys.argv[1]), int(sys.argv[2])
    family = socket.AF_INET6 if "6" in sys.argv[3:] else socket.AF_INET
    noshut = "noshut" in sys.argv[3:]
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    s = socket.socket(family); s.connect((host, port)); s.setblocking(False)
    block = bytes(range(256)) * 256
    sent = hashlib.sha256(); got = hashlib.sha256(); total = 0; left = n
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(block); off = 0; writing = True
    def done():
        print(total, sent.hexdigest() == got.hexdigest()); sys.exit(0)
    while True:
        events = sel.select(30)
        if not events:
            print(total, "timeout"); sys.exit(1)
        for key, ev in events:
            if ev & selectors.EVENT_WRITE and writing:
                if left == 0:
                    writing = False
                    sel.modify(s, selectors.EVENT_READ)
                    if not noshut:
                        s.shutdown(socket.SHUT_WR)
                else:
                    k = s.send(view[off:off + min(left, len(block) - off)])
                    sent.update(view[off:off + k]); off = (off + k) % len(block); left -= k
            if ev & selectors.EVENT_READ:
                d = s.recv(1 << 20)
                if not d:
                    done()
                got.update(d); total += len(d)
                if noshut and total >= n:
                    done()
""")


@pytest_twisted.ensureDeferred
async def test_tcp_relay_round_trip_with_half_close() -> None:
    """20 MB through a tcp stream server to an echo come back identical; EOF travels both ways."""
    up = echo()
    svc = await start_proxy(stream_conf(f'proxy_url = "tcp://127.0.0.1:{up.getHost().port}"'))
    try:
        out, err, code = await run_python("-c", ROUND_TRIP, str(bound_port(svc)), str(20 * 1024 * 1024))
        assert code == 0, err
        assert out.split() == [str(20 * 1024 * 1024).encode(), b"True"]
    finally:
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_tcp_relay_ipv6() -> None:
    """A stream server on [::1] relays to an IPv6 upstream."""
    up = echo("::1")
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "[::1]:0"\n'
                            f'proxy_url = "tcp://[::1]:{up.getHost().port}"\n')
    try:
        out, err, code = await run_python("-c", ROUND_TRIP, str(bound_port(svc)), "100000", "6")
        assert code == 0, err
        assert out.split() == [b"100000", b"True"]
    finally:
        await _stop(svc, up)


class Client(protocol.Protocol):
    """Sends its payload once told to, collects the echo until it has it all."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = bytearray()
        self.connected_d: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= len(self.payload) and not self.done.called:
            self.done.callback(bytes(self.got))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.got))


async def _open_clients(port: int, payloads: list[bytes]) -> list[Client]:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    clients = [Client(p) for p in payloads]
    await defer.gatherResults([connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), c)
                               for c in clients])
    return clients


@pytest_twisted.ensureDeferred
async def test_500_concurrent_connections_all_echo() -> None:
    """500 connections open at once through one stream server; each gets its own bytes back."""
    up = echo()
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{up.getHost().port}"'))
    try:
        payloads = [(b"%05d:" % i) * 2000 for i in range(500)]
        clients = await _open_clients(bound_port(svc), payloads)
        factory = svc.features[0].factories[0]
        for _ in range(500):
            if len(factory.active) == 500:
                break
            await deferLater(0.02)
        assert len(factory.active) == 500  # all open at the same time
        for c in clients:
            c.transport.write(c.payload)
        results = await defer.gatherResults([c.done for c in clients])
        assert results == payloads
    finally:
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_dead_member_is_skipped_and_marked_failed() -> None:
    """A refused member is retried on the next one; after max_fails it is marked failed."""
    up = echo()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    ups = (f'[[stream.upstream]]\nname = "g"\nserver = [{{ addr = "127.0.0.1:{dead_port}", max_fails = 2 }}, '
           f'{{ addr = "127.0.0.1:{up.getHost().port}" }}]\n')
    svc = await start_proxy(stream_conf('up_name = "g"', ups))
    try:
        for i in range(6):
            clients = await _open_clients(bound_port(svc), [b"hello %d" % i])
            clients[0].transport.write(clients[0].payload)
            assert await clients[0].done == b"hello %d" % i
        group = svc.features[0].factories[0].group
        states = {m["addr"]: m["state"] for m in group.snapshot()["members"]}
        assert states[f"127.0.0.1:{dead_port}"] == "failed"
    finally:
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_no_reachable_member_closes_client() -> None:
    """With every member refusing, the client is closed (no hang, no error logged)."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{dead_port}"'))
    try:
        clients = await _open_clients(bound_port(svc), [b"x"])
        assert await clients[0].done == b""
    finally:
        await _stop(svc)


@pytest_twisted.ensureDeferred
async def test_max_connections_and_idle_timeout() -> None:
    """Over max_connections a client is closed at once; an idle relay closes after client_timeout."""
    up = echo()
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{up.getHost().port}"\n'
                                        'max_connections = 2\nclient_timeout = "1s"'))
    try:
        clients = await _open_clients(bound_port(svc), [b"a", b"b", b"c"])
        third = await clients[2].done
        assert third == b""
        for c in clients[:2]:
            c.transport.write(c.payload)
        assert [await c.done for c in clients[:2]] == [b"a", b"b"]
        dispatch = next(iter(svc.registry.listeners.values())).dispatch
        while dispatch.open:
            await deferLater(0.01)
        idle = (await _open_clients(bound_port(svc), [b"zz"]))[0]
        start = reactor.seconds()
        assert await idle.done == b""
        assert 0.8 < reactor.seconds() - start < 3
    finally:
        await _stop(svc, up)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_send_proxy_protocol(version: str) -> None:
    """send_proxy_protocol writes a header naming the client before its first byte."""
    port, f = capture_server()
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{port.getHost().port}"\n'
                                        f'send_proxy_protocol = "{version}"'))
    try:
        clients = await _open_clients(bound_port(svc), [b"payload"])
        clients[0].transport.write(b"payload")
        await f.arrived
        while not f.seen[0].data.endswith(b"payload"):
            await deferLater(0.01)
        data = f.seen[0].data
        header = data[: -len(b"payload")]
        info = (V1Parser.parse(header.rstrip(b"\r\n")) if version == "v1" else V2Parser.parse(header))
        local = clients[0].transport.getHost()
        assert (info.source.host, info.source.port) == (local.host, local.port)
        assert info.destination.port == bound_port(svc)
        clients[0].transport.loseConnection()
    finally:
        await _stop(svc, port)


ACCEPT = textwrap.dedent("""
    import socket, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(10)
    if mode == "v1":
        s.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\\r\\n" + b"hi")
    elif mode == "v2":
        import struct
        body = socket.inet_aton("198.51.100.9") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5151, 80)
        hdr = b"\\r\\n\\r\\n\\x00\\r\\nQUIT\\n\\x21\\x11" + struct.pack("!H", len(body)) + body
        for b in hdr:  # one byte at a time: split headers are read too
            s.sendall(bytes([b]))
        s.sendall(b"hi")
    else:
        s.sendall(b"hi")
    got = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except OSError:
        pass
    sys.stdout.write(got.decode("latin1"))
""")


@pytest_twisted.ensureDeferred
async def test_accept_proxy_protocol_from_trusted_front() -> None:
    """A trusted front's v1/v2 header (split byte by byte) becomes the client address sent upstream."""

    class Reply(protocol.Protocol):
        got = b""

        def dataReceived(self, data: bytes) -> None:
            self.got += data
            if self.got.endswith(b"hi"):
                self.transport.write(self.got)
                self.transport.loseConnection()

    rf = protocol.Factory.forProtocol(Reply)
    rf.noisy = False
    up = reactor.listenTCP(0, rf, interface="127.0.0.1")
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{up.getHost().port}"\n'
                                        'accept_proxy_protocol = true\nproxy_protocol_from = "127.0.0.1/32"\n'
                                        'send_proxy_protocol = "v1"'))
    try:
        out, err, code = await run_python("-c", ACCEPT, str(bound_port(svc)), "v1")
        assert code == 0, err
        assert out.startswith(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 ") and out.endswith(b"\r\nhi")
        out, err, code = await run_python("-c", ACCEPT, str(bound_port(svc)), "v2")
        assert out.startswith(b"PROXY TCP4 198.51.100.9 127.0.0.1 5151 ") and out.endswith(b"\r\nhi")
        out, err, code = await run_python("-c", ACCEPT, str(bound_port(svc)), "none")
        assert out == b""  # a trusted front must send the header
    finally:
        await _stop(svc, up)


@pytest_twisted.ensureDeferred
async def test_untrusted_source_sending_proxy_header_is_closed() -> None:
    """From an untrusted address, a PROXY header closes the connection; plain traffic passes."""
    up = echo()
    svc = await start_proxy(stream_conf(f'proxy_url = "127.0.0.1:{up.getHost().port}"\n'
                                        'accept_proxy_protocol = true\nproxy_protocol_from = "10.0.0.0/8"'))
    try:
        out, _err, code = await run_python("-c", ACCEPT, str(bound_port(svc)), "v1")
        assert code == 0 and out == b""
        clients = await _open_clients(bound_port(svc), [b"plain"])
        clients[0].transport.write(b"plain")
        assert await clients[0].done == b"plain"
    finally:
        await _stop(svc, up)


class UdpEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(data, addr)


UDP_CLIENT = textwrap.dedent("""
    import socket, sys, random, json
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    rnd = random.Random(7); ok = 0; sizes = []
    for i in range(n):
        size = 1 if i == 0 else 60000 if i == 1 else rnd.randint(1, 60000)
        payload = (i.to_bytes(4, "big") * (size // 4 + 1))[:size]
        u.sendto(payload, (host, port))
        data, _ = u.recvfrom(70000)
        ok += data == payload; sizes.append(size)
    print(json.dumps([ok, min(sizes), max(sizes)]))
""")


@pytest.mark.parametrize("host,n", [("127.0.0.1", 1000), ("::1", 200)])
@pytest_twisted.ensureDeferred
async def test_udp_datagrams_round_trip_intact(host: str, n: int) -> None:
    """Datagrams of 1–60 000 bytes come back intact through a udp stream server (IPv4, IPv6)."""
    echo_port = reactor.listenUDP(0, UdpEcho(), interface=host, maxPacketSize=65535)
    bracket = f"[{host}]" if ":" in host else host
    svc = await start_proxy(f'[stream]\n[[stream.upstream]]\nname = "u"\nbind = "udp"\n'
                            f'server = ["{bracket}:{echo_port.getHost().port}"]\n'
                            f'[[stream.server]]\nbind_addr = "{bracket}:0"\nbind_mode = "udp"\nup_name = "u"\n')
    try:
        out, err, code = await run_python("-c", UDP_CLIENT, host, str(bound_port(svc, "udp")), str(n))
        assert code == 0, err
        assert json.loads(out) == [n, 1, 60000]
        relay = svc.features[0].relays[0]
        assert len(relay.sessions) == 1 and relay.dropped == 0
    finally:
        await _stop(svc, echo_port)


@pytest_twisted.ensureDeferred
async def test_udp_sessions_are_per_client() -> None:
    """Two clients get their own upstream sockets; replies go back to the right one."""
    echo_port = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1", maxPacketSize=65535)
    svc = await start_proxy(f'[stream]\n[[stream.server]]\nbind_addr = "127.0.0.1:0"\nbind_mode = "udp"\n'
                            f'proxy_url = "127.0.0.1:{echo_port.getHost().port}"\n')
    try:
        script = textwrap.dedent(f"""
            import socket
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.settimeout(5)
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.settimeout(5)
            for i in range(20):
                a.sendto(b"a%d" % i, ("127.0.0.1", {bound_port(svc, "udp")}))
                b.sendto(b"b%d" % i, ("127.0.0.1", {bound_port(svc, "udp")}))
                assert a.recvfrom(100)[0] == b"a%d" % i
                assert b.recvfrom(100)[0] == b"b%d" % i
            print("ok")
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0 and out.strip() == b"ok", err
        relay = svc.features[0].relays[0]
        assert len(relay.sessions) == 2
        ports = {s.port.getHost().port for s in relay.sessions.values()}
        assert len(ports) == 2
    finally:
        await _stop(svc, echo_port)



@pytest_twisted.ensureDeferred
async def test_active_tcp_health_check_marks_dead_member_down() -> None:
    """A group with health_check probes members by TCP connect; a dead one is taken out of rotation."""
    up = echo()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    ups = (f'[[stream.upstream]]\nname = "g"\nserver = [{{ addr = "127.0.0.1:{dead_port}", max_fails = 0 }}, '
           f'"127.0.0.1:{up.getHost().port}"]\n'
           'health_check = { interval = "100ms", timeout = "1s", fall = 2, rise = 1 }\n')
    svc = await start_proxy(stream_conf('up_name = "g"', ups))
    try:
        group = svc.features[0].factories[0].group
        for _ in range(100):
            if not group.members[0].check_healthy:
                break
            await deferLater(0.05)
        assert not group.members[0].check_healthy and group.members[1].check_healthy
        clients = await _open_clients(bound_port(svc), [b"via the live one"])
        clients[0].transport.write(clients[0].payload)
        assert await clients[0].done == b"via the live one"
    finally:
        await _stop(svc, up)
