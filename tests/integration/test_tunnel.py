"""NAT traversal on loopback: a tunnel server and clients as in-process services (SPEC §8, §3)."""

from __future__ import annotations

import hashlib
import re
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from wmproxy_tw.certgen import generate
from wmproxy_tw.service import ProxyService
from wmproxy_tw.tunnel.client import TunnelClient
from wmproxy_tw.tunnel.connection import HIGH_WATER
from wmproxy_tw.tunnel.frames import DEFAULT_WINDOW, Error, FrameDecoder
from wmproxy_tw.tunnel.server import TunnelServer

from ..helpers import deferLater, origin, pattern, run, run_python, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WMPROXY_CONFIGS = Path(__file__).resolve().parents[2] / ".." / "shared" / "wmproxy-configs"


def port_of(svc: ProxyService, name: str) -> int:
    """The port a listener of that name got."""
    for listener in svc.registry.listeners.values():
        if listener.name == name:
            return listener.bound.port
    raise KeyError(name)


def feature(svc: ProxyService, kind: type) -> Any:
    """The running TunnelServer or TunnelClient of a service (held by its feature)."""
    for f in svc.features:
        inner = getattr(f, "server", None) if kind is TunnelServer else getattr(f, "client", None)
        if isinstance(inner, kind):
            return inner
    raise LookupError(kind)


async def until(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> float:
    """Wait until ``check()`` holds; returns the seconds it took (fails after ``timeout``)."""
    start = reactor.seconds()
    while not check():
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(step)
    return reactor.seconds() - start


async def stop(*things: Any) -> None:
    for thing in things:
        method = getattr(thing, "stopService", None) or thing.stopListening
        await defer.maybeDeferred(method)


class Logs:
    """Collects formatted log lines while active."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> Logs:  # noqa: PYI034
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        self.lines.append(formatEvent(event))

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


class Tagged(resource.Resource):
    """An origin answering every path with its tag (to tell origins apart)."""

    isLeaf = True

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag.encode()

    def render_GET(self, request: server.Request) -> bytes:
        return self.tag + b" " + request.uri


def tagged_origin(tag: str) -> Any:
    site = server.Site(Tagged(tag))
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")


async def tunnel_server(extra: str = "", auth: str = 'tokens = ["good-token"]') -> ProxyService:
    return await start_proxy(textwrap.dedent(f"""\
        [proxy]
        center_addr = "127.0.0.1:0"
        map_http_bind = "127.0.0.1:0"
        {auth}
        """) + extra)


async def tunnel_client(server_svc: ProxyService, mappings: str, extra: str = "",
                        auth: str = 'token = "good-token"', wait: bool = True) -> ProxyService:
    svc = await start_proxy(textwrap.dedent(f"""\
        [proxy]
        server = "127.0.0.1:{port_of(server_svc, "tunnel server")}"
        {auth}
        """) + extra + "\n" + textwrap.dedent(mappings))
    if wait:
        client = feature(svc, TunnelClient)
        await client.when_connected()
        names = {m.name for m in client.cfg.mappings}
        await until(lambda: client.conn is not None
                    and names <= client.conn.accepted | set(client.conn.refused))
    return svc


def mapping(name: str, mode: str, local_port: int | None = None, domain: str | None = None,
            remote_port: int | None = None) -> str:
    """One [[proxy.mappings]] table."""
    lines = ["[[proxy.mappings]]", f'name = "{name}"', f'mode = "{mode}"']
    if local_port is not None:
        lines.append(f'local_addr = "127.0.0.1:{local_port}"')
    if domain is not None:
        lines.append(f'domain = "{domain}"')
    if remote_port is not None:
        lines.append(f"remote_port = {remote_port}")
    return "\n".join(lines) + "\n"


async def curl(*args: str) -> tuple[int, bytes]:
    """curl -s with the status code appended on its own line: (status, body)."""
    out, _err, _code = await run("curl", "-s", "-w", "\n%{http_code}", *args)
    body, _, status = out.rpartition(b"\n")
    return int(status or 0), body


@pytest_twisted.ensureDeferred
async def test_wmproxy_server_and_client_toml_shape(tmp_path: Path) -> None:
    """wmproxy's server.toml/client.toml (ports, certs adapted): http by Host, tcp, chained proxy."""
    if not WMPROXY_CONFIGS.is_dir():
        pytest.skip("wmproxy example configs not found next to the repository")
    certs = generate(tmp_path / "certs")
    web = origin()
    server_text = (WMPROXY_CONFIGS / "server.toml").read_text(encoding="utf-8")
    for key in ("bind_addr", "map_http_bind", "map_tcp_bind", "map_https_bind"):
        server_text = re.sub(rf'^{key} = ".*"$', f'{key} = "127.0.0.1:0"', server_text, flags=re.MULTILINE)
    server_text += textwrap.dedent(f"""
        cert = "{certs.server_cert}"
        key = "{certs.server_key}"
        ca = "{certs.ca_cert}"
        map_cert = "{certs.server_cert}"
        map_key = "{certs.server_key}"
        """)
    srv = await start_proxy(server_text)
    client_text = (WMPROXY_CONFIGS / "client.toml").read_text(encoding="utf-8")
    client_text = client_text.replace('server = "127.0.0.1:8091"',
                                      f'server = "127.0.0.1:{port_of(srv, "tunnel server")}"')
    client_text = client_text.replace('bind_addr = "0.0.0.0:8090"', 'bind_addr = "127.0.0.1:0"')
    client_text = client_text.replace("127.0.0.1:8080", f"127.0.0.1:{web.getHost().port}")
    client_text = client_text.replace("[proxy]\n", textwrap.dedent(f"""\
        [proxy]
        cert = "{certs.client_cert}"
        key = "{certs.client_key}"
        ca = "{certs.ca_cert}"
        """), 1)
    cli = await start_proxy(client_text)
    client = feature(cli, TunnelClient)
    try:
        await client.when_connected()
        await until(lambda: client.conn is not None and {"web", "tcp"} <= client.conn.accepted)
        http = port_of(srv, "tunnel http")
        out, err, code = await run("curl", "-sS", "-D", "-", "-H", "Host: localhost",
                                   f"http://127.0.0.1:{http}/headers")
        assert code == 0, err
        text = out.decode()
        assert text.startswith("HTTP/1.1 200")
        assert "X-Forward-For: 127.0.0.1" in text  # proxy x-forward-for {client_ip}
        assert re.search(r"^From: http://localhost(:\d+)?/headers\r?$", text, re.MULTILINE | re.IGNORECASE)
        assert re.search(r"^last-modified: from proxy\r?$", text, re.MULTILINE | re.IGNORECASE)
        upload = tmp_path / "upload"
        upload.write_bytes(pattern(3_000_000))
        status, body = await curl("-H", "Host: localhost", "--data-binary", f"@{upload}",
                                  f"http://127.0.0.1:{http}/echo")
        assert status == 200 and body == pattern(3_000_000)  # a request body, both ways
        status, body = await curl("-H", "Host: nobody.example", f"http://127.0.0.1:{http}/")
        assert status == 404 and b"nobody.example" in body
        # the tcp mapping on map_tcp_bind reaches the same private service as raw bytes
        tcp = port_of(srv, "tunnel tcp")
        status, body = await curl(f"http://127.0.0.1:{tcp}/blob?n=300000")
        assert status == 200 and body == pattern(300000)
        # map_https_bind terminates TLS with map_cert; no https mapping is registered: 404
        https = port_of(srv, "tunnel https")
        status, body = await curl("--cacert", str(certs.ca_cert), f"https://localhost:{https}/")
        assert status == 404 and b"localhost" in body
        # bind + server: the forward proxy is chained to the server, whose auth applies
        bind = port_of(cli, "forward proxy (chained)")
        url = f"http://127.0.0.1:{web.getHost().port}/blob?n=1000"
        status, _ = await curl("-x", f"http://127.0.0.1:{bind}", url)
        assert status == 407
        status, body = await curl("-x", f"http://wmproxy:wmproxy@127.0.0.1:{bind}", url)
        assert status == 200 and body == pattern(1000)
        status, body = await curl("-x", f"socks5h://wmproxy:wmproxy@127.0.0.1:{bind}", url)
        assert status == 200 and body == pattern(1000)
    finally:
        await stop(cli, srv, web)


@pytest_twisted.ensureDeferred
async def test_map_proxy_bind_is_served_by_the_clients_forward_proxy() -> None:
    """Public connections on map_proxy_bind reach origins through the client's proxy engine."""
    web = origin()
    srv = await tunnel_server('map_proxy_bind = "127.0.0.1:0"\n')
    cli = await tunnel_client(srv, mapping("px", "proxy"), extra='allow_open_proxy = true')
    try:
        port = port_of(srv, "tunnel proxy")
        url = f"http://127.0.0.1:{web.getHost().port}/blob?n=200000"
        status, body = await curl("-x", f"http://127.0.0.1:{port}", url)
        assert status == 200 and body == pattern(200000)
        status, body = await curl("-x", f"socks5h://127.0.0.1:{port}", url)
        assert status == 200 and body == pattern(200000)
    finally:
        await stop(cli, srv, web)


@pytest_twisted.ensureDeferred
async def test_two_clients_own_domains_and_a_third_is_refused() -> None:
    """Two clients get their own traffic (exact and wildcard); a taken domain is refused clearly."""
    a, b, c = tagged_origin("A"), tagged_origin("B"), tagged_origin("C")
    srv = await tunnel_server()
    with Logs() as logs:
        one = await tunnel_client(srv, mapping("web", "http", a.getHost().port, domain="a.test"),
                                  extra='client_name = "one"')
        two = await tunnel_client(srv, mapping("web", "http", b.getHost().port,
                                               domain="b.test *.wild.test"),
                                  extra='client_name = "two"')
        three = await tunnel_client(srv, mapping("copy", "http", c.getHost().port, domain="A.test"),
                                    extra='client_name = "three"')
    try:
        refused = feature(three, TunnelClient).conn.refused
        assert "copy" in refused
        assert "domain 'A.test' is already served by client 'one' (mapping 'web')" == refused["copy"]
        assert logs.has("mapping copy refused by")  # the client logs the reason
        http = port_of(srv, "tunnel http")
        for host, tag in (("a.test", b"A"), ("b.test", b"B"), ("x.wild.test", b"B"),
                          ("deep.x.wild.test", b"B")):
            status, body = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{http}/p")
            assert (status, body) == (200, tag + b" /p"), host
        status, body = await curl("-H", "Host: wild.test", f"http://127.0.0.1:{http}/")
        assert status == 404  # *.wild.test does not cover wild.test itself
    finally:
        await stop(one, two, three, srv, a, b, c)


class Source(Protocol):
    """Sends 1 MiB after an 'N' (then closes), or endlessly after an 'S' (with back-pressure)."""

    def dataReceived(self, data: bytes) -> None:
        if data[:1] == b"N":
            self.transport.write(pattern(1 << 20))
            self.transport.loseConnection()
        elif data[:1] == b"S":
            self.factory.endless.append(self)
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.transport.connected:
            self.transport.write(b"s" * 65536)

    def stopProducing(self) -> None:
        self.paused = True


class Sink(Protocol):
    """A public client: sends its letter, collects the answer (or stalls without reading)."""

    def __init__(self, letter: bytes) -> None:
        self.letter = letter
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.letter)
        if self.letter == b"S":
            self.transport.pauseProducing()  # never read: the stalled reader

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(bytes(self.data))


@pytest_twisted.ensureDeferred
async def test_hundred_streams_one_stalled_reader() -> None:
    """100 streams on one tunnel; one reader stalls: 99 finish byte-identical, buffers bounded."""
    factory = Factory.forProtocol(Source)
    factory.endless = []
    factory.noisy = False
    source = reactor.listenTCP(0, factory, interface="127.0.0.1")
    srv = await tunnel_server('map_tcp_bind = "127.0.0.1:0"\n')
    cli = await tunnel_client(srv, mapping("src", "tcp", source.getHost().port))
    port = port_of(srv, "tunnel tcp")
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    sinks = [Sink(b"S")] + [Sink(b"N") for _ in range(99)]
    try:
        for sink in sinks:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), sink)
        results = await defer.gatherResults([s.done for s in sinks[1:]])
        expected = hashlib.sha256(pattern(1 << 20)).digest()
        assert all(hashlib.sha256(r).digest() == expected for r in results)
        assert not sinks[0].done.called
        # the endless source is paused by back-pressure, and what the tunnel holds is bounded
        await until(lambda: bool(factory.endless) and factory.endless[0].paused)
        server_conn = next(iter(feature(srv, TunnelServer).connections))
        client_conn = feature(cli, TunnelClient).conn
        for conn in (server_conn, client_conn):
            held = sum(s._pending + sum(len(x) for x in s._recv if x) + s._unconsumed
                       for s in conn.streams.values())
            assert held <= HIGH_WATER + 65536 + DEFAULT_WINDOW
        await until(lambda: client_conn.mux.stream_count == 1)  # only the stalled one is left
        assert server_conn.mux.stream_count == 1
    finally:
        for sink in sinks[:1]:
            sink.transport.abortConnection()
        await stop(cli, srv, source)


@pytest_twisted.ensureDeferred
async def test_client_gone_gives_502_at_once_and_it_comes_back() -> None:
    """The client's link drops: 502 within 1 s; it reconnects within its backoff and serves again."""
    web = tagged_origin("W")
    srv = await tunnel_server()
    cli = await tunnel_client(srv, mapping("web", "http", web.getHost().port, domain="w.test"))
    client = feature(cli, TunnelClient)
    http = port_of(srv, "tunnel http")
    try:
        status, _ = await curl("-H", "Host: w.test", f"http://127.0.0.1:{http}/")
        assert status == 200
        client.conn.transport.abortConnection()  # as if the client process died
        start = reactor.seconds()
        status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{http}/")
        assert status == 502 and b"offline" in body
        assert reactor.seconds() - start < 1.0
        took = await until(lambda: client.sessions == 2 and client.conn is not None
                           and "web" in client.conn.accepted, timeout=5.0)
        assert took <= 2.5  # first retry after 1 s
        status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{http}/again")
        assert (status, body) == (200, b"W /again")
    finally:
        await stop(cli, srv, web)


@pytest_twisted.ensureDeferred
async def test_wrong_token_is_refused_and_logged_on_both_sides() -> None:
    """A bad token: AUTH_FAILED, both ends log it, nothing is registered or served."""
    web = tagged_origin("W")
    srv = await tunnel_server()
    with Logs() as logs:
        cli = await tunnel_client(srv, mapping("web", "http", web.getHost().port, domain="w.test"),
                                  auth='token = "bad-token"', wait=False)
        client = feature(cli, TunnelClient)
        await until(lambda: client.auth_failed is not None)
        await until(lambda: logs.has("authentication failed (token)"))
    try:
        assert logs.has("refused our credentials: invalid credentials")
        assert not any("bad-token" in line for line in logs.lines)  # secrets never logged
        assert client.sessions == 0
        assert feature(srv, TunnelServer).registry.routes() == []
        status, _ = await curl("-H", "Host: w.test", f"http://127.0.0.1:{port_of(srv, 'tunnel http')}/")
        assert status == 404
    finally:
        await stop(cli, srv, web)


@pytest_twisted.ensureDeferred
async def test_random_bytes_to_center_addr_get_an_error_and_a_close() -> None:
    """Garbage on center_addr: an ERROR frame, then the server closes the connection."""
    srv = await tunnel_server()
    port = port_of(srv, "tunnel server")
    script = textwrap.dedent(f"""
        import os, socket, sys
        s = socket.create_connection(("127.0.0.1", {port}))
        s.settimeout(10)
        s.sendall(b"\\xff" + os.urandom(4095))
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        sys.stdout.buffer.write(got)
    """)
    try:
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        frames = FrameDecoder().feed(out)
        assert len(frames) == 1 and isinstance(frames[0], Error)
        assert "unknown frame type 0xff" in frames[0].message
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_tls_failures_never_fall_back_to_cleartext(tmp_path: Path) -> None:
    """An unknown CA or a missing client certificate gives no session; nothing goes in clear."""
    certs = generate(tmp_path / "good")
    other = generate(tmp_path / "other")
    tls = f'tc = true\ncert = "{certs.server_cert}"\nkey = "{certs.server_key}"\n'
    srv = await tunnel_server(tls + f'two_way_tls = true\nca = "{certs.ca_cert}"\n')
    server = feature(srv, TunnelServer)
    wrong_ca = await tunnel_client(srv, "", extra=f'ts = true\nca = "{other.ca_cert}"\n', wait=False)
    no_cert = await tunnel_client(srv, "", extra=f'ts = true\nca = "{certs.ca_cert}"\n', wait=False)
    cleartext = await tunnel_client(srv, "", wait=False)
    good = await tunnel_client(srv, "", extra=textwrap.dedent(f"""\
        ts = true
        two_way_tls = true
        ca = "{certs.ca_cert}"
        cert = "{certs.client_cert}"
        key = "{certs.client_key}"
        """))
    try:
        await deferLater(0.5)
        for svc in (wrong_ca, no_cert, cleartext):
            assert feature(svc, TunnelClient).sessions == 0
        assert feature(good, TunnelClient).sessions == 1
        assert [c for c in server.connections if c.identity is not None] != []
        assert len([c for c in server.connections if c.identity is not None]) == 1
    finally:
        await stop(wrong_ca, no_cert, cleartext, good, srv)


@pytest_twisted.ensureDeferred
async def test_remote_port_opens_and_closes_with_its_client() -> None:
    """A tcp mapping with remote_port gets its own listener, closed when the client goes."""
    web = origin()
    srv = await tunnel_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    cli = await tunnel_client(srv, mapping("ssh", "tcp", web.getHost().port, remote_port=free))
    try:
        status, body = await curl(f"http://127.0.0.1:{free}/blob?n=5000")
        assert status == 200 and body == pattern(5000)
        await stop(cli)
        await until(lambda: feature(srv, TunnelServer).registry.ports == {})
        status, _ = await curl(f"http://127.0.0.1:{free}/")
        assert status == 0  # nothing listens any more
    finally:
        await stop(srv, web)


@pytest_twisted.ensureDeferred
async def test_conf_examples_work(tmp_path: Path) -> None:
    """conf/tunnel-server.toml and conf/tunnel-client.toml (ports, cert paths adapted) work."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    certs = generate(tmp_path / "certs")
    web = origin()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]

    def adapt(text: str) -> str:
        text = text.replace('"certs/', f'"{tmp_path}/certs/')
        text = re.sub(r'"127\.0\.0\.1:80\d\d"', '"127.0.0.1:0"', text)
        text = text.replace('"127.0.0.1:22"', '"127.0.0.1:0"')  # ssh: the test origin too
        return text.replace("remote_port = 2222", f"remote_port = {free}")

    srv = await start_proxy(adapt((conf / "tunnel-server.toml").read_text()))
    client_text = adapt((conf / "tunnel-client.toml").read_text())
    client_text = client_text.replace('server = "127.0.0.1:0"',
                                      f'server = "127.0.0.1:{port_of(srv, "tunnel server")}"')
    client_text = client_text.replace('local_addr = "127.0.0.1:0"',
                                      f'local_addr = "127.0.0.1:{web.getHost().port}"')
    cli = await start_proxy(client_text)
    client = feature(cli, TunnelClient)
    try:
        await client.when_connected()
        await until(lambda: client.conn is not None and len(client.conn.accepted) == 4)
        http, https = port_of(srv, "tunnel http"), port_of(srv, "tunnel https")
        out, err, code = await run("curl", "-sS", "-D", "-", "-H", "Host: localhost",
                                   f"http://127.0.0.1:{http}/headers")
        assert code == 0, err
        assert b"X-Served-By: tunnel" in out and b"X-Forwarded-For: 127.0.0.1" in out
        status, body = await curl(f"http://127.0.0.1:{port_of(srv, 'tunnel tcp')}/blob?n=7")
        assert (status, body) == (200, pattern(7))
        status, body = await curl(f"http://127.0.0.1:{free}/blob?n=9")
        assert (status, body) == (200, pattern(9))
        url = f"http://127.0.0.1:{web.getHost().port}/blob?n=11"
        proxy = port_of(srv, "tunnel proxy")
        status, _ = await curl("-x", f"http://127.0.0.1:{proxy}", url)
        assert status == 407  # the client's forward proxy wants its credentials
        status, body = await curl("-x", f"http://proxyuser:change-me-too@127.0.0.1:{proxy}", url)
        assert (status, body) == (200, pattern(11))
        status, _ = await curl("--cacert", str(certs.ca_cert), f"https://localhost:{https}/x")
        assert status == 404  # no https mapping in the example
    finally:
        await stop(cli, srv, web)


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_replaces_its_silent_session_only() -> None:
    """A named client's new session replaces its unanswering old one, never a live one."""
    web = tagged_origin("W")
    srv = await tunnel_server('heartbeat_interval = "200ms"\nheartbeat_timeout = "10s"\n')
    web_mapping = mapping("web", "http", web.getHost().port, domain="w.test")
    with Logs() as logs:
        old = await tunnel_client(srv, web_mapping, extra='client_name = "same"')
        silent = feature(old, TunnelClient).conn
        silent.transport.pauseProducing()  # as if its link were cut: it neither reads ...
        silent.heartbeat = None  # ... nor pings
        await deferLater(0.5)
        new = await tunnel_client(srv, web_mapping, extra='client_name = "same"')
        live_dup = await tunnel_client(srv, web_mapping, extra='client_name = "same"')
    try:
        assert logs.has("a new connection replaces the silent one")
        assert "web" in feature(new, TunnelClient).conn.accepted
        assert "web" in feature(live_dup, TunnelClient).conn.refused
        status, body = await curl("-H", "Host: w.test",
                                  f"http://127.0.0.1:{port_of(srv, 'tunnel http')}/n")
        assert (status, body) == (200, b"W /n")
    finally:
        await stop(old, new, live_dup, srv, web)


class Upgrader(Protocol):
    """A private service that accepts an HTTP upgrade (101) and then echoes raw bytes."""

    def connectionMade(self) -> None:
        self.head = b""
        self.upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            _head, rest = self.head.split(b"\r\n\r\n", 1)
            self.upgraded = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
            if rest:
                self.transport.write(rest)


@pytest_twisted.ensureDeferred
async def test_upgrade_through_an_http_mapping_becomes_a_raw_relay() -> None:
    """A 101 answer turns the public connection into a byte relay through the stream."""
    factory = Factory.forProtocol(Upgrader)
    factory.noisy = False
    private = reactor.listenTCP(0, factory, interface="127.0.0.1")
    srv = await tunnel_server()
    cli = await tunnel_client(srv, mapping("ws", "http", private.getHost().port, domain="ws.test"))
    script = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port_of(srv, "tunnel http")}))
        s.settimeout(10)
        s.sendall(b"GET /chat HTTP/1.1\\r\\nHost: ws.test\\r\\nUpgrade: websocket\\r\\n"
                  b"Connection: Upgrade\\r\\nSec-WebSocket-Key: x\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n")
        got = b""
        while b"\\r\\n\\r\\n" not in got:
            got += s.recv(4096)
        head, rest = got.split(b"\\r\\n\\r\\n", 1)
        s.sendall(b"raw bytes after the upgrade")
        while len(rest) < 27:
            rest += s.recv(4096)
        print(head.split(b"\\r\\n")[0].decode(), rest.decode())
    """)
    try:
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.decode().strip() == "HTTP/1.1 101 Switching Protocols raw bytes after the upgrade"
    finally:
        await stop(cli, srv, private)
