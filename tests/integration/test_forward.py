"""Forward proxy on real sockets: curl, raw clients, SOCKS5 UDP, back-pressure."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from ..helpers import bound_port, deferLater, echo_server, origin, pattern, run, run_input, run_python, start_proxy

pytestmark = pytest.mark.integration


async def _proxy(extra: str = "") -> tuple[object, int]:
    svc = await start_proxy(f'[proxy]\nbind = "127.0.0.1:0"\n{extra}')
    return svc, bound_port(svc)


async def _stop(*things: object) -> None:
    for t in things:
        stop = getattr(t, "stopService", None) or t.stopListening  # type: ignore[attr-defined]
        await defer.maybeDeferred(stop)


@pytest_twisted.ensureDeferred
async def test_http_get_through_proxy_is_byte_identical(tmp_path: Path) -> None:
    """An absolute-form GET of 50 MB returns the origin's bytes unchanged."""
    svc, port = await _proxy()
    web = origin()
    n = 50 * 1024 * 1024
    out = tmp_path / "blob"
    try:
        _o, err, code = await run("curl", "-sS", "-o", str(out), "-x", f"http://127.0.0.1:{port}",
                                  f"http://127.0.0.1:{web.getHost().port}/blob?n={n}")
        assert code == 0, err
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(pattern(n)).digest()
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_keepalive_requests_and_via_header() -> None:
    """Several URLs on one curl connection are all answered; Via is added, hop-by-hop removed."""
    svc, port = await _proxy()
    web = origin()
    base = f"http://127.0.0.1:{web.getHost().port}"
    try:
        out, err, code = await run("curl", "-sS", "-x", f"http://127.0.0.1:{port}", "-H", "Proxy-Connection: keep-alive",
                                   "-H", "Keep-Alive: 5", f"{base}/one", f"{base}/headers", f"{base}/two")
        assert code == 0, err
        text = out.decode()
        assert "hello from origin /one" in text and "hello from origin /two" in text
        assert "Via: 1.1 wmproxy-tw" in text
        assert "Proxy-Connection" not in text and "Keep-Alive" not in text
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_socks5h_get() -> None:
    """curl through SOCKS5 with a remote-resolved name gets the origin's bytes."""
    svc, port = await _proxy()
    web = origin()
    try:
        out, err, code = await run("curl", "-sS", "-x", f"socks5h://127.0.0.1:{port}",
                                   f"http://localhost:{web.getHost().port}/blob?n=100000")
        assert code == 0, err
        assert out == pattern(100000)
    finally:
        await _stop(svc, web)


def _tls_origin(tmp_path: Path) -> object:
    from twisted.internet import ssl
    from twisted.web import server

    from ..helpers import Blob
    from ..tlsutil import make_cert

    cert, key = make_cert(tmp_path, "localhost")
    pem = ssl.PrivateCertificate.loadPEM(Path(cert).read_text() + Path(key).read_text())
    site = server.Site(Blob())
    site.noisy = False
    return reactor.listenSSL(0, site, pem.options(), interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_https_through_connect(tmp_path: Path) -> None:
    """An HTTPS request tunnelled with CONNECT returns the origin's bytes."""
    svc, port = await _proxy()
    web = _tls_origin(tmp_path)
    try:
        out, err, code = await run("curl", "-sS", "-k", "-x", f"http://127.0.0.1:{port}",
                                   f"https://localhost:{web.getHost().port}/blob?n=300000")
        assert code == 0, err
        assert out == pattern(300000)
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_connect_ipv6_literal() -> None:
    """CONNECT [::1]:port opens a tunnel to an IPv6 origin."""
    svc, port = await _proxy()
    echo = echo_server("::1")
    try:
        script = textwrap.dedent(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}))
            s.sendall(b"CONNECT [::1]:{echo.getHost().port} HTTP/1.1\\r\\nHost: [::1]:{echo.getHost().port}\\r\\n\\r\\n")
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                head += s.recv(100)
            s.sendall(b"ping6")
            got = b""
            while len(got) < 5:
                got += s.recv(100)
            print(head.split(b"\\r\\n")[0].decode(), got.decode())
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.decode().split() == ["HTTP/1.1", "200", "Connection", "Established", "ping6"]
    finally:
        await _stop(svc, echo)


@pytest_twisted.ensureDeferred
async def test_upstream_failures_are_502() -> None:
    """A refused target answers 502 with a short plain body (an unresolvable one: test_faults.py, with an
    in-process resolver, so that no DNS query leaves the machine)."""
    svc, port = await _proxy("connect_timeout = \"2s\"")
    try:
        out, _e, _c = await run("curl", "-s", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                                "http://127.0.0.1:1/")
        assert out.endswith(b"502") and b"refused" in out
    finally:
        await _stop(svc)


AUTH = 'username = "alice"\npassword = "s3cret"'


@pytest_twisted.ensureDeferred
async def test_http_auth_407_and_success() -> None:
    """No or wrong credentials → 407 with Proxy-Authenticate; right ones → 200."""
    svc, port = await _proxy(AUTH)
    web = origin()
    url = f"http://127.0.0.1:{web.getHost().port}/"
    try:
        out, _e, _c = await run("curl", "-s", "-D", "-", "-o", "/dev/null", "-x", f"http://127.0.0.1:{port}", url)
        assert b" 407 " in out.split(b"\r\n")[0]
        assert b'Proxy-Authenticate: Basic realm="wmproxy"' in out
        out, _e, _c = await run("curl", "-s", "-w", "%{http_code}", "-o", "/dev/null",
                                "-x", f"http://alice:wrong@127.0.0.1:{port}", url)
        assert out == b"407"
        out, _e, _c = await run("curl", "-s", "-w", "%{http_code}", "-o", "/dev/null",
                                "-x", f"http://alice:s3cret@127.0.0.1:{port}", url)
        assert out == b"200"
        out, _e, _c = await run("curl", "-s", "-w", "%{http_code}", "-o", "/dev/null", "-H",
                                "Proxy-Authorization: Basic !!!notbase64", "-x", f"http://127.0.0.1:{port}", url)
        assert out == b"407"
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_every_keepalive_request_is_authenticated() -> None:
    """A second request on the same connection without credentials is refused (407)."""
    svc, port = await _proxy(AUTH)
    web = origin()
    try:
        script = textwrap.dedent(f"""
            import base64, socket
            s = socket.create_connection(("127.0.0.1", {port}))
            cred = base64.b64encode(b"alice:s3cret").decode()
            url = "http://127.0.0.1:{web.getHost().port}/x"
            s.sendall(f"GET {{url}} HTTP/1.1\\r\\nHost: h\\r\\nProxy-Authorization: Basic {{cred}}\\r\\n\\r\\n".encode())
            f = s.makefile("rb")
            first = f.readline()
            length = 0
            while True:
                line = f.readline()
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":")[1])
                if line in (b"\\r\\n", b""):
                    break
            f.read(length)
            s.sendall(f"GET {{url}} HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n".encode())
            second = f.readline()
            print(first.split()[1].decode(), second.split()[1].decode())
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.split() == [b"200", b"407"]
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_socks5_auth() -> None:
    """SOCKS5 user/pass: right credentials relay, wrong ones and none are refused."""
    svc, port = await _proxy(AUTH)
    web = origin()
    url = f"http://127.0.0.1:{web.getHost().port}/ok"
    try:
        out, err, code = await run("curl", "-sS", "--socks5", f"alice:s3cret@127.0.0.1:{port}", url)
        assert code == 0 and b"hello from origin /ok" in out, err
        _o, _e, code = await run("curl", "-sS", "--socks5", f"alice:nope@127.0.0.1:{port}", url)
        assert code != 0
        _o, _e, code = await run("curl", "-sS", "--socks5", f"127.0.0.1:{port}", url)
        assert code != 0
    finally:
        await _stop(svc, web)


class UdpEcho(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(data, addr)


@pytest_twisted.ensureDeferred
async def test_socks5_udp_associate_echo() -> None:
    """UDP ASSOCIATE relays real datagrams (up to 60 000 bytes) to an echo server and back."""
    svc, port = await _proxy()
    echo = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1", maxPacketSize=65535)
    try:
        script = textwrap.dedent(f"""
            import socket, struct, json
            t = socket.create_connection(("127.0.0.1", {port}))
            t.sendall(b"\\x05\\x01\\x00"); assert t.recv(2) == b"\\x05\\x00"
            t.sendall(b"\\x05\\x03\\x00\\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
            rep = t.recv(10); assert rep[1] == 0, rep
            relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
            u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            results = []
            for size in (1, 1000, 60000):
                payload = bytes([size % 251]) * size
                hdr = b"\\x00\\x00\\x00\\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", {echo.getHost().port})
                u.sendto(hdr + payload, relay)
                data, _ = u.recvfrom(70000)
                results.append(data[:4] == b"\\x00\\x00\\x00\\x01" and data[10:] == payload)
            print(json.dumps(results))
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert json.loads(out) == [True, True, True]
    finally:
        await _stop(svc, echo)


@pytest_twisted.ensureDeferred
async def test_socks5_bind_is_not_supported() -> None:
    """BIND is answered with reply 0x07 (command not supported)."""
    svc, port = await _proxy()
    try:
        script = textwrap.dedent(f"""
            import socket
            t = socket.create_connection(("127.0.0.1", {port}))
            t.sendall(b"\\x05\\x01\\x00"); assert t.recv(2) == b"\\x05\\x00"
            t.sendall(b"\\x05\\x02\\x00\\x01\\x7f\\x00\\x00\\x01\\x00\\x50")
            print(t.recv(10)[1])
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.strip() == b"7"
    finally:
        await _stop(svc)


HOSTILE = {
    "garbage": (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
    "socks_bad_version_after_greeting": (b"\x05\x01\x00\x04\x01\x00\x01", b"\x05\x00"),
    "socks_no_methods": (b"\x05\x00", b"\x05\xff"),
    "socks_bad_atyp": (b"\x05\x01\x00\x05\x01\x00\x09", b"\x05\x00\x05\x08"),
    "request_line_1mb": (b"GET http://x/" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n", b"414"),
    "200_headers": (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",
                    b"431"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest_twisted.ensureDeferred
async def test_hostile_input_gets_error_or_clean_close(name: str) -> None:
    """Malformed input gets the right error reply or a clean close; the proxy serves others after."""
    payload, expect = HOSTILE[name]
    svc, port = await _proxy()
    web = origin()
    try:
        script = textwrap.dedent(f"""
            import socket, sys
            s = socket.create_connection(("127.0.0.1", {port})); s.settimeout(10)
            data = sys.stdin.buffer.read()
            try:
                s.sendall(data)
            except OSError:
                pass
            got = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            sys.stdout.buffer.write(got)
        """)
        out, err, code = await run_input([sys.executable, "-c", script], payload)
        assert code == 0, err
        assert expect in out[:64]
        out, err, code = await run("curl", "-sS", "-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{web.getHost().port}/after")
        assert code == 0 and b"/after" in out, err
    finally:
        await _stop(svc, web)


class Firehose(Protocol):
    """Writes as fast as its consumer allows; counts what it produced."""

    produced = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        Firehose.produced += 65536
        self.transport.write(b"x" * 65536)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_reader_that_never_reads_does_not_grow_memory() -> None:
    """A client that never reads stops the upstream: the proxy buffers a bounded amount."""
    svc, port = await _proxy()
    Firehose.produced = 0
    f = Factory.forProtocol(Firehose)
    f.noisy = False
    hose = reactor.listenTCP(0, f, interface="127.0.0.1")
    try:
        script = textwrap.dedent(f"""
            import socket, sys, time
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", {port}))
            s.sendall(b"CONNECT 127.0.0.1:{hose.getHost().port} HTTP/1.1\\r\\n\\r\\n")
            s.recv(39)
            sys.stdin.read()  # hold the connection open, reading nothing, until told to stop
        """)
        path = Path("/tmp/wmproxy-bp-script.py")
        path.write_text(script)
        from twisted.internet import protocol

        class Holder(protocol.ProcessProtocol):
            def __init__(self) -> None:
                self.ended: defer.Deferred[None] = defer.Deferred()

            def processEnded(self, reason: object) -> None:
                self.ended.callback(None)

        holder = Holder()
        proc = reactor.spawnProcess(holder, sys.executable, [sys.executable, str(path)], env=None)
        await deferLater(1.5)
        first = Firehose.produced
        await deferLater(1.5)
        second = Firehose.produced
        proc.closeStdin()
        await holder.ended
        # kernel buffers (both sockets) plus one relay buffer are all that may be in flight
        assert second - first <= 256 * 1024, (first, second)
        assert second < 64 * 1024 * 1024
    finally:
        await _stop(svc, hose)


@pytest_twisted.ensureDeferred
async def test_keepalive_connection_to_several_origins() -> None:
    """One client connection may ask for URLs on different origins in turn."""
    svc, port = await _proxy()
    one, two = origin(), origin()
    try:
        urls = [f"http://127.0.0.1:{w.getHost().port}/n{i}" for i, w in enumerate((one, two, one))]
        out, err, code = await run("curl", "-sS", "-x", f"http://127.0.0.1:{port}", *urls)
        assert code == 0, err
        assert out.count(b"hello from origin") == 3 and b"/n2" in out
    finally:
        await _stop(svc, one, two)


@pytest_twisted.ensureDeferred
async def test_slow_head_gets_408() -> None:
    """A client that sends half a request head and stalls gets 408 at the header deadline."""
    svc, port = await _proxy('header_timeout = "500ms"')
    try:
        script = textwrap.dedent(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port})); s.settimeout(10)
            s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\\r\\nHost: x")
            print(s.recv(100).split(b"\\r\\n")[0].decode())
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0, err
        assert out.split()[1] == b"408"
    finally:
        await _stop(svc)
