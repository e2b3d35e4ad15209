"""Reverse proxy on real sockets: routing, headers, errors, TLS, WebSocket, access log."""

from __future__ import annotations

import base64
import hashlib
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from wmproxy_tw.config import load_text
from wmproxy_tw.service import ProxyService, plan

from ..helpers import bound_port, deferLater, run, run_python, start_proxy
from .revutil import Origin, free_port, raw

pytestmark = pytest.mark.integration


async def _stop(*things: Any) -> None:
    for t in things:
        stop = getattr(t, "stopService", None) or getattr(t, "stop", None) or t.stopListening
        await defer.maybeDeferred(stop)


def _conf(locations: str, server: str = "", http: str = "") -> str:
    return textwrap.dedent(http) + '\n[[http.server]]\nbind_addr = "127.0.0.1:0"\n' + textwrap.dedent(server) + \
        "\n" + textwrap.dedent(locations)


async def curl(*args: str) -> tuple[str, int]:
    out, err, code = await run("curl", "-sS", *args)
    return (out + err).decode("latin-1"), code


@pytest_twisted.ensureDeferred
async def test_routes_static_proxy_404_and_prefix_replacement() -> None:
    """Locations in file order: static text with variables, a prefix replaced by proxy_url's path, 404."""
    o = Origin("o1")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/static"
        static_response = "I'm Ok {{client_ip}} {{path}}"
        static_status = 202
        static_headers = ["X-Static yes"]
        [[http.server.location]]
        rule = "/api/"
        proxy_url = "http://{o.addr}/v2/"
        [[http.server.location]]
        rule = "~^/(app|b)/"
        proxy_url = "http://{o.addr}"
    """))
    port = bound_port(svc)
    try:
        out, _ = await curl("-i", f"http://127.0.0.1:{port}/static/a%20b")
        assert " 202 " in out.splitlines()[0] and "X-Static: yes" in out and out.endswith("I'm Ok 127.0.0.1 /static/a b")
        out, _ = await curl(f"http://127.0.0.1:{port}/api/x/y?q=1")
        assert out == "o1 GET /v2/x/y?q=1\n"
        out, _ = await curl(f"http://127.0.0.1:{port}/app/x?z")
        assert out == "o1 GET /app/x?z\n"
        out, _ = await curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{port}/other")
        assert out == "404"
    finally:
        await _stop(svc, o)


@pytest_twisted.ensureDeferred
async def test_virtual_hosts_by_host_header() -> None:
    """Two servers on one port: Host picks up_name; an unknown host gets the first server."""
    svc = await start_proxy("""
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        up_name = "a.test"
        [[http.server.location]]
        static_response = "server a"
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        up_name = "b.test www.b.test"
        [[http.server.location]]
        static_response = "server b"
    """.replace("        ", ""))
    port = bound_port(svc)
    try:
        for host, want in (("a.test", "server a"), ("B.test:80", "server b"), ("www.b.test", "server b"),
                           ("c.test", "server a")):
            out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{port}/")
            assert out == want, host
    finally:
        await _stop(svc)


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_spoofing_and_proxy_authorization() -> None:
    """An untrusted client's X-Forwarded-For is replaced; Proxy-Authorization and hop-by-hop fields never
    reach the upstream; Host is kept; a trusted peer's chain is extended."""
    o = Origin("o")
    loc = f"""
        [[http.server.location]]
        proxy_url = "http://{o.addr}"
    """
    svc = await start_proxy(_conf(loc))
    trusted = await start_proxy(_conf(loc, server='trusted_proxies = "127.0.0.0/8"'))
    args = ["-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Forwarded-Proto: gopher", "-H", "Forwarded: for=6.6.6.6",
            "-H", "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==", "-H", "Connection: keep-alive, X-Hop",
            "-H", "X-Hop: 1", "-H", "Keep-Alive: 5", "-H", "TE: trailers", "-H", "Host: front.test"]
    try:
        out, _ = await curl(*args, f"http://127.0.0.1:{bound_port(svc)}/headers")
        lines = out.lower()
        assert "x-forwarded-for: 127.0.0.1\n" in lines and "6.6.6.6" not in lines
        assert "x-forwarded-proto: http\n" in lines and "x-forwarded-host: front.test\n" in lines
        assert "host: front.test\n" in lines
        for absent in ("proxy-authorization", "c2vjcmv0", "x-hop", "keep-alive", "te:", "forwarded: for"):
            assert absent not in lines, absent
        out, _ = await curl(*args, f"http://127.0.0.1:{bound_port(trusted)}/headers")
        assert "x-forwarded-for: 6.6.6.6, 127.0.0.1\n" in out.lower() and "proxy-authorization" not in out.lower()
    finally:
        await _stop(svc, trusted, o)


@pytest_twisted.ensureDeferred
async def test_header_rules_on_every_keepalive_request() -> None:
    """Request and response header rules apply to each request of a keep-alive connection."""
    o = Origin("o")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        proxy_url = "http://{o.addr}"
        headers = ["proxy X-Client {{client_ip}}", "proxy - User-Agent", "+ X-Served-By wmproxy-tw",
                   "X-Path {{path}}"]
    """))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    try:
        out, _ = await curl("-i", "-A", "agent/1", f"{url}/headers", f"{url}/headers?2")
        assert out.count("X-Served-By: wmproxy-tw") == 2 and out.count("X-Path: /headers") == 2
        assert out.count("X-Client: 127.0.0.1") == 2 and "agent/1" not in out
        assert out.count("HTTP/1.1 200") == 2
    finally:
        await _stop(svc, o)


@pytest_twisted.ensureDeferred
async def test_request_smuggling_battery_never_reaches_the_upstream() -> None:
    """CL+TE, duplicate CL, obfuscated TE, bare LF, oversized chunk size, missing Host → 400, nothing upstream."""
    o = Origin("o")
    svc = await start_proxy(_conf(f'[[http.server.location]]\nproxy_url = "http://{o.addr}"\n'))
    port = bound_port(svc)
    battery = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\nGET /smuggled HTTP/1.1\nHost: x\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    try:
        for payload in battery:
            got = await raw(port, payload)
            assert got.startswith(b"HTTP/1.1 400 "), (payload, got[:80])
        assert o.res.seen == []
    finally:
        await _stop(svc, o)


@pytest_twisted.ensureDeferred
async def test_upstream_errors_502_504_and_reset_mid_body() -> None:
    """Refused → 502; no answer within proxy_read_timeout → 504; a reset inside the body closes the
    client connection (curl sees a partial transfer, never a complete-looking one)."""
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")

    class Truncate(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            reactor.callLater(0.05, self.transport.abortConnection)

    trunc = reactor.listenTCP(0, Factory.forProtocol(Truncate), interface="127.0.0.1")

    class Garbage(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    garbage = reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/garbage"
        proxy_url = "http://127.0.0.1:{garbage.getHost().port}"
        [[http.server.location]]
        rule = "/refused"
        proxy_url = "http://127.0.0.1:1"
        [[http.server.location]]
        rule = "/silent"
        proxy_url = "http://127.0.0.1:{silent.getHost().port}"
        proxy_read_timeout = "0.3s"
        [[http.server.location]]
        rule = "/trunc"
        proxy_url = "http://127.0.0.1:{trunc.getHost().port}"
    """))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    try:
        out, _ = await curl("-w", "%{http_code}", f"{url}/refused")
        assert out.endswith("502") and "127.0.0.1:1" not in out
        out, _ = await curl("-w", "%{http_code}", f"{url}/silent")
        assert out.endswith("504")
        out, code = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/trunc")
        assert code in (18, 56) and out.startswith("200")  # partial transfer / connection reset
        out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/garbage")
        assert out == "502"
    finally:
        await _stop(svc, silent, trunc, garbage)


@pytest_twisted.ensureDeferred
async def test_next_upstream_retries_idempotent_requests_only() -> None:
    """A refused connect is retried on the next member for GET, not for POST (502)."""
    o = Origin("o")
    refused = free_port()
    pair = f"""
        [[http.upstream]]
        name = "pair"
        server = [{{ addr = "127.0.0.1:{refused}", max_fails = 100 }}, "{o.addr}"]
    """
    svc = await start_proxy(_conf('[[http.server.location]]\nproxy_url = "http://pair"\n', http=pair))
    url = f"http://127.0.0.1:{bound_port(svc)}/x"
    try:
        out, _ = await curl(url, url)
        assert out == "o GET /x\no GET /x\n"
        codes = []
        for _ in range(2):
            out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", "-d", "a=1", url)
            codes.append(out)
        assert sorted(codes) == ["200", "502"]
    finally:
        await _stop(svc, o)


@pytest_twisted.ensureDeferred
async def test_https_upstream_is_verified(tmp_path: Path) -> None:
    """An https:// upstream is verified against proxy_ssl_ca (502 without it); proxy_ssl_verify = false only by choice."""
    from twisted.internet import ssl
    from twisted.web import server

    from ..helpers import Blob
    from ..tlsutil import make_cert

    cert, key = make_cert(tmp_path, "localhost")
    pem = ssl.PrivateCertificate.loadPEM(Path(cert).read_text() + Path(key).read_text())
    site = server.Site(Blob())
    site.noisy = False
    web = reactor.listenSSL(0, site, pem.options(), interface="127.0.0.1")
    up = f"https://localhost:{web.getHost().port}"
    group = f"""
        [[http.upstream]]
        name = "tls"
        server = ["localhost:{web.getHost().port}"]
        health_check = {{ interval = "0.1s", path = "/health", timeout = "1s", fall = 1, rise = 1 }}
    """
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/group"
        proxy_url = "https://tls"
        proxy_ssl_name = "localhost"
        proxy_ssl_ca = "{cert}"
        [[http.server.location]]
        rule = "/ca"
        proxy_url = "{up}"
        proxy_ssl_ca = "{cert}"
        [[http.server.location]]
        rule = "/system"
        proxy_url = "{up}"
        [[http.server.location]]
        rule = "/insecure"
        proxy_url = "{up}"
        proxy_ssl_verify = false
    """, http=group))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    try:
        await deferLater(0.35)  # a few active checks of the https group, over TLS
        tls_group = next(g for f in svc.features for g in f.groups() if g.name == "tls")
        assert tls_group.snapshot()["members"][0]["state"] == "up"
        out, _ = await curl(f"{url}/group/x")
        assert out == "hello from origin /group/x\n"
        out, _ = await curl(f"{url}/ca/1")
        assert out == "hello from origin /ca/1\n"
        out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/system")
        assert out == "502"
        out, _ = await curl(f"{url}/insecure")
        assert out == "hello from origin /insecure\n"
    finally:
        await _stop(svc, web)


@pytest_twisted.ensureDeferred
async def test_sni_picks_the_certificate_per_name(tmp_path: Path) -> None:
    """Two certificates on one bind_ssl port: each name gets its own; an unknown name gets the first."""
    from ..tlsutil import make_cert

    a_cert, a_key = make_cert(tmp_path, "a.test")
    b_cert, b_key = make_cert(tmp_path, "b.test")
    svc = await start_proxy(f"""
[[http.server]]
bind_ssl = "127.0.0.1:0"
up_name = "a.test"
cert = "{a_cert}"
key = "{a_key}"
[[http.server.location]]
static_response = "server a {{scheme}}"
[[http.server]]
bind_ssl = "127.0.0.1:0"
up_name = "b.test"
cert = "{b_cert}"
key = "{b_key}"
[[http.server.location]]
static_response = "server b"
""")
    port = bound_port(svc)
    try:
        for name, ca, want in (("a.test", a_cert, "server a https"), ("b.test", b_cert, "server b")):
            out, code = await curl("--cacert", ca, "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/")
            assert code == 0 and out == want, out
        script = textwrap.dedent(f"""
            import socket, ssl
            ctx = ssl.create_default_context(cafile={a_cert!r})
            ctx.check_hostname = False
            with socket.create_connection(("127.0.0.1", {port})) as s:
                with ctx.wrap_socket(s, server_hostname="unknown.test") as t:
                    print(dict(x[0] for x in t.getpeercert()["subject"])["commonName"])
        """)
        out, err, code = await run_python("-c", script)
        assert code == 0 and out.decode().strip() == "a.test", err
    finally:
        await _stop(svc)


class WSOrigin(Protocol):
    """Answers a WebSocket handshake with its own 101, then echoes bytes back reversed."""

    def connectionMade(self) -> None:
        self.buf = b""
        self.open = False

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data[::-1])
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head).group(1)  # type: ignore[union-attr]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Origin: ws\r\n\r\nhello")
            self.open = True
            if rest:
                self.transport.write(rest[::-1])


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_passthrough() -> None:
    """@ws + is_ws: the upstream's own 101 is relayed (no subprotocol invented) and bytes flow both ways;
    an upgrade to a location without is_ws gets 403."""
    ws = reactor.listenTCP(0, Factory.forProtocol(WSOrigin), interface="127.0.0.1")
    o = Origin("o")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "@ws"
        is_ws = true
        proxy_url = "http://127.0.0.1:{ws.getHost().port}"
        headers = ["+ aaa bbb"]
        [[http.server.location]]
        rule = "/"
        proxy_url = "http://{o.addr}"
    """))
    port = bound_port(svc)
    hello = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    try:
        got = await raw(port, hello + b"abc", timeout=0.5)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head and b"X-Origin: ws" in head
        assert b"aaa: bbb" in head and b"Sec-WebSocket-Protocol" not in head
        assert body == b"hellocba"
        svc2 = await start_proxy(_conf(f'[[http.server.location]]\nproxy_url = "http://{o.addr}"\n'))
        got = await raw(bound_port(svc2), hello, timeout=0.5)
        assert got.startswith(b"HTTP/1.1 403 ") and b"WebSocket" in got and o.res.seen == []
        await _stop(svc2)
    finally:
        await _stop(svc, ws, o)


@pytest_twisted.ensureDeferred
async def test_access_log_lines(tmp_path: Path) -> None:
    """A line per request, written at the end with the real status, upstream address and timings."""
    o = Origin("o")
    log = tmp_path / "logs" / "access.log"
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/static"
        static_response = "hi"
        [[http.server.location]]
        proxy_url = "http://{o.addr}"
    """, http=f"""
        [http]
        access_log = "acc main"
        [http.log_format]
        main = "{{client_ip}} {{method}} {{url}} {{status}} {{up_status}} {{up_addr}} {{body_bytes_sent}} {{request_time}} {{up_response_time}} {{user_agent}} {{nope}}"
        [http.log_names]
        acc = "{log} info"
    """))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    try:
        await curl("-A", "ua/1", f"{url}/static", f"{url}/x?y=1", f"{url}/missing-is-proxied")
        lines = log.read_text().splitlines()
        assert len(lines) == 3
        f = lines[0].split()
        assert f[:7] == ["127.0.0.1", "GET", "/static", "200", "-", "-", "2"] and f[8:] == ["-", "ua/1", "-"]
        f = lines[1].split()
        assert f[:6] == ["127.0.0.1", "GET", "/x?y=1", "200", "200", o.addr] and float(f[7]) >= 0 and float(f[8]) >= 0
    finally:
        await _stop(svc, o)


@pytest_twisted.ensureDeferred
async def test_allow_deny_and_upload_with_expect_continue() -> None:
    """deny_ip → 403 before any upstream contact; an upload with Expect: 100-continue is streamed through."""
    o = Origin("o")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/denied"
        deny_ip = "127.0.0.0/8"
        proxy_url = "http://{o.addr}"
        [[http.server.location]]
        rule = "/"
        allow_ip = "127.0.0.1 ::1"
        proxy_url = "http://{o.addr}"
    """))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    data = bytes(range(256)) * 4096
    try:
        out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/denied")
        assert out == "403" and o.res.seen == []
        from ..helpers import run_input

        out, err, code = await run_input(["curl", "-sS", "-H", "Expect: 100-continue", "--data-binary", "@-",
                                          f"{url}/upload"], data)
        assert code == 0 and out.decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n", err
    finally:
        await _stop(svc, o)


def test_wmproxy_reverse_example_plans() -> None:
    """wmproxy's reverse.toml loads and plans (file_server, try_paths, limit_req, rate_limit included)."""
    text = Path("/work/shared/wmproxy-configs/reverse.toml").read_text()
    lines = plan(load_text(text, "reverse.toml").config)
    assert "reverse proxy (http) on 0.0.0.0:82: soft.wm-proxy.com" in lines


@pytest_twisted.ensureDeferred
async def test_wmproxy_reverse_example_routes_as_it_means() -> None:
    """wmproxy's reverse.toml (ports aside) routes /static to its text, @ws upgrades to the ws group,
    /root to its file server (try_paths, rate_limit, limit_req on), and nothing else (404)."""
    text = Path("/work/shared/wmproxy-configs/reverse.toml").read_text()
    http = text[text.index("[http]"):text.index("[stream]")]
    ws = reactor.listenTCP(0, Factory.forProtocol(WSOrigin), interface="127.0.0.1")
    http = http.replace("127.0.0.1:8081", f"127.0.0.1:{ws.getHost().port}").replace("0.0.0.0:82", "127.0.0.1:0")
    http = http.replace('"logs/', '"' + str(Path("/tmp") / f"wmproxy-test-{id(ws)}") + "/")
    svc = ProxyService(reactor, load_text(http, "reverse.toml"))
    svc.bind_all()
    svc.startService()
    port = bound_port(svc)
    try:
        out, _ = await curl("-i", "-H", "Host: soft.wm-proxy.com", f"http://127.0.0.1:{port}/static")
        assert out.endswith("I'm Ok 127.0.0.1") and "last-modified: from proxy" in out.lower()
        got = await raw(port, b"GET /chat HTTP/1.1\r\nHost: soft.wm-proxy.com\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", timeout=0.5)
        assert got.startswith(b"HTTP/1.1 101 ") and b"aaa: bbb" in got and got.endswith(b"hello")
        out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/other")
        assert out == "404"
        out, _ = await curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/root/")
        assert out in ("200", "404")  # the file server answers (what depends on the working directory)
    finally:
        await _stop(svc, ws)


@pytest_twisted.ensureDeferred
async def test_body_size_per_location_and_max_connections() -> None:
    """A location's client_max_body_size answers 413 before the upstream sees anything (declared or
    chunked); a listener's max_connections closes connections over the cap."""
    o = Origin("o")
    svc = await start_proxy(_conf(f"""
        [[http.server.location]]
        rule = "/small"
        client_max_body_size = "1k"
        proxy_url = "http://{o.addr}"
        [[http.server.location]]
        proxy_url = "http://{o.addr}"
    """, server="max_connections = 2"))
    port = bound_port(svc)
    try:
        got = await raw(port, b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 413 ")
        got = await raw(port, b"POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"400\r\n" + b"a" * 1024 + b"\r\n1\r\n")
        assert got.startswith(b"HTTP/1.1 413 ") and o.res.seen == []
        held = [RawHold(), RawHold()]
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        for h in held:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), h)
        got = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2.0)
        assert got == b""
        for h in held:
            h.transport.loseConnection()
    finally:
        await _stop(svc, o)


class RawHold(Protocol):
    """A client connection that just stays open."""
