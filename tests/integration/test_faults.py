"""Fault injection on real sockets (issue #9): upstreams that die or go silent, DNS failures, a silent
tunnel link, unwritable access logs, files changed while being served.  Each test pins what the client
sees and that the service keeps serving afterwards.

Covered elsewhere (not repeated here): an upstream *reset* (RST) mid-body, 502 on refused and 504 on a
silent upstream of the reverse proxy (test_reverse.py::test_upstream_errors_502_504_and_reset_mid_body);
a SIGSTOPped tunnel client detected by the server within heartbeat_timeout
(test_tunnel_twistd.py::test_killed_restarted_and_stopped_client_process).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from wmproxy_tw.tunnel.client import TunnelClient
from wmproxy_tw.tunnel.server import TunnelServer

from ..helpers import RawClient, bound_port, origin, pattern, raw_connect, start_proxy
from .test_tunnel import feature, mapping, port_of, tagged_origin, tunnel_server, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


# ------------------------------------------------------------------------------------------ helpers

async def _stop(*things: Any) -> None:
    for t in things:
        stop = getattr(t, "stopService", None) or getattr(t, "stopListening", None) or t.stop
        await defer.maybeDeferred(stop)


class Scripted(Protocol):
    """An upstream that reads one request head, writes ``script`` and then closes cleanly (FIN),
    or stalls (``close=False``) with the connection open."""

    script = b""
    close = True

    def connectionMade(self) -> None:
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = b""
            self.transport.write(self.script)
            if self.close:
                self.transport.loseConnection()


def scripted(script: bytes, close: bool = True) -> Any:
    """A listening port whose connections play ``script`` (see :class:`Scripted`)."""
    proto = type("Play", (Scripted,), {"script": script, "close": close})
    f = Factory.forProtocol(proto)
    f.noisy = False
    return reactor.listenTCP(0, f, interface="127.0.0.1")


async def exchange(port: int, request: bytes, seconds: float = 10.0) -> tuple[bytes, bool]:
    """Send ``request`` on a fresh connection; return (everything received, closed by the proxy).
    ``closed`` is False when the proxy still held the connection open after ``seconds``."""
    c = await raw_connect(port)
    c.transport.write(request)  # type: ignore[union-attr]
    try:
        await c.closed.addTimeout(seconds, reactor)
        return c.buf, True
    except defer.TimeoutError:
        c.transport.abortConnection()  # type: ignore[union-attr]
        return c.buf, False


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, fields, body


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body as far as it goes: (payload, saw the terminating 0-chunk)."""
    out, i = bytearray(), 0
    while True:
        end = body.find(b"\r\n", i)
        if end < 0:
            return bytes(out), False
        size = int(body[i:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out), body[end + 2:end + 4] == b"\r\n"
        start = end + 2
        if len(body) < start + size + 2:
            out += body[start:start + size]
            return bytes(out), False
        out += body[start:start + size]
        i = start + size + 2


class Logs:
    """Collects (namespace, level, text) of every log event while active."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __enter__(self) -> "Logs":
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        level = event.get("log_level")
        self.events.append((event.get("log_namespace", ""), getattr(level, "name", ""), formatEvent(event)))

    def matching(self, text: str) -> list[str]:
        return [t for _n, _l, t in self.events if text in t]


def _get(path: str, host: str = "x", close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def still_serves(port: int, path: str = "/ok", expect: bytes = b"") -> None:
    """One more request on a fresh connection is answered 200 (with ``expect`` in the body)."""
    got, _closed = await exchange(port, _get(path, close=True))
    status, _f, body = split_response(got)
    assert status == 200 and expect in body, got[:200]


# ------------------------------------------------------- upstream dies mid-response (reverse proxy)

HEAD_CL = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_reverse_upstream_closes_mid_body_client_sees_a_close(tmp_path: Path) -> None:
    """Upstream FIN inside a Content-Length body → the client gets the head, fewer bytes, then a close;
    inside a chunked body → no terminating 0-chunk, then a close; a close-delimited body is complete.
    The access log says 200 with the bytes really sent and an empty {request_completion}."""
    cl = scripted(HEAD_CL + b"a" * 1000)
    chunked = scripted(HEAD_CHUNKED + b"3e8\r\n" + b"c" * 1000 + b"\r\n")
    eof = scripted(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"e" * 1000)
    log = tmp_path / "access.log"
    svc = await start_proxy(textwrap.dedent(f"""
        [http]
        access_log = "acc main"
        [http.log_format]
        main = "{{url}} {{status}} {{up_status}} {{body_bytes_sent}} [{{request_completion}}]"
        [http.log_names]
        acc = "{log} info"
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        [[http.server.location]]
        rule = "/cl"
        proxy_url = "http://127.0.0.1:{cl.getHost().port}"
        [[http.server.location]]
        rule = "/chunked"
        proxy_url = "http://127.0.0.1:{chunked.getHost().port}"
        [[http.server.location]]
        rule = "/eof"
        proxy_url = "http://127.0.0.1:{eof.getHost().port}"
        [[http.server.location]]
        rule = "/ok"
        static_response = "still here"
    """))
    port = bound_port(svc)
    try:
        got, closed = await exchange(port, _get("/cl"))
        status, fields, body = split_response(got)
        assert closed and status == 200 and fields["content-length"] == "100000"
        assert body == b"a" * 1000  # fewer bytes than announced, then the close

        got, closed = await exchange(port, _get("/chunked"))
        status, fields, body = split_response(got)
        payload, terminated = dechunk(body)
        assert closed and status == 200 and fields["transfer-encoding"] == "chunked"
        assert payload == b"c" * 1000 and not terminated and not body.endswith(b"0\r\n\r\n")

        got, _closed = await exchange(port, _get("/eof", close=True))
        status, fields, body = split_response(got)
        payload, terminated = dechunk(body) if fields.get("transfer-encoding") == "chunked" else (body, True)
        assert status == 200 and payload == b"e" * 1000 and terminated  # EOF is this body's end

        await still_serves(port, "/ok", b"still here")
        await until(lambda: log.exists() and len(log.read_text().splitlines()) == 4)
        lines = log.read_text().splitlines()
        assert lines[0] == "/cl 200 200 1000 []"
        assert lines[1] == "/chunked 200 200 1000 []"
        assert lines[2] == "/eof 200 200 1000 [OK]"
        assert lines[3] == "/ok 200 - 10 [OK]"
    finally:
        await _stop(svc, cl, chunked, eof)


@pytest_twisted.ensureDeferred
async def test_reverse_upstream_stalls_mid_body_closed_at_read_timeout() -> None:
    """An upstream that stops sending inside the body: the client's connection is closed once
    proxy_read_timeout passes (the head is already out: no 504 can be sent), not held forever."""
    stall = scripted(HEAD_CL + b"s" * 500, close=False)
    silent = scripted(b"", close=False)
    svc = await start_proxy(textwrap.dedent(f"""
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        proxy_read_timeout = "400ms"
        [[http.server.location]]
        rule = "/stall"
        proxy_url = "http://127.0.0.1:{stall.getHost().port}"
        [[http.server.location]]
        rule = "/silent"
        proxy_url = "http://127.0.0.1:{silent.getHost().port}"
        [[http.server.location]]
        rule = "/ok"
        static_response = "fine"
    """))
    port = bound_port(svc)
    try:
        start = reactor.seconds()
        got, closed = await exchange(port, _get("/stall"))
        status, _f, body = split_response(got)
        assert closed and status == 200 and body == b"s" * 500
        assert 0.3 <= reactor.seconds() - start < 5.0

        start = reactor.seconds()
        got, _closed = await exchange(port, _get("/silent", close=True))
        assert got.startswith(b"HTTP/1.1 504 "), got[:100]
        assert 0.3 <= reactor.seconds() - start < 5.0
        await still_serves(port, "/ok", b"fine")
    finally:
        await _stop(svc, stall, silent)


# ---------------------------------------------------------- upstream dies mid-response (forward)

@pytest_twisted.ensureDeferred
async def test_forward_proxy_upstream_closes_mid_body() -> None:
    """Forward proxy, absolute-form GET: an origin closing inside a Content-Length or a chunked body
    gives the client fewer bytes (no 0-chunk) and a closed connection; the proxy keeps serving."""
    cl = scripted(HEAD_CL + b"a" * 1000)
    chunked = scripted(HEAD_CHUNKED + b"3e8\r\n" + b"c" * 1000 + b"\r\n")
    web = origin()
    svc = await start_proxy('[proxy]\nbind = "127.0.0.1:0"\n')
    port = bound_port(svc)

    def absolute(p: int, path: str = "/") -> bytes:
        close = "Connection: close\r\n" if path != "/" else ""
        return f"GET http://127.0.0.1:{p}{path} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n{close}\r\n".encode()

    try:
        got, closed = await exchange(port, absolute(cl.getHost().port))
        status, fields, body = split_response(got)
        assert closed and status == 200 and fields["content-length"] == "100000" and body == b"a" * 1000

        got, closed = await exchange(port, absolute(chunked.getHost().port))
        status, fields, body = split_response(got)
        payload, terminated = dechunk(body)
        assert closed and status == 200 and payload == b"c" * 1000 and not terminated

        got, _closed = await exchange(port, absolute(web.getHost().port, "/blob?n=5000"))
        status, _f, body = split_response(got)
        assert status == 200 and body == pattern(5000)
    finally:
        await _stop(svc, cl, chunked, web)


# ------------------------------------------------------------------------------------ DNS failure

@implementer(IHostnameResolver)
class FailingResolver:
    """Resolves nothing, for every name (no query ever leaves the process); records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        self.asked.append(hostName)
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_502_everywhere() -> None:
    """With a resolver that finds nothing (injected in-process: no DNS query is sent), a named
    upstream gives 502 on the reverse proxy, the forward proxy (GET and CONNECT), and SOCKS5 answers
    "host unreachable"; all keep serving."""
    resolver = FailingResolver()
    old = reactor.nameResolver
    reactor.installNameResolver(resolver)
    web = origin()
    rev = await start_proxy(textwrap.dedent("""
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        [[http.server.location]]
        rule = "/named"
        proxy_url = "http://upstream.wmproxy-test.invalid:8080"
        [[http.server.location]]
        rule = "/ok"
        static_response = "ok"
    """))
    fwd = await start_proxy('[proxy]\nbind = "127.0.0.1:0"\n')
    rport, fport = bound_port(rev), bound_port(fwd)
    try:
        got, _ = await exchange(rport, _get("/named", close=True))
        status, _f, body = split_response(got)
        assert status == 502 and b"upstream.wmproxy-test.invalid" not in body
        await still_serves(rport, "/ok", b"ok")

        name = "origin.wmproxy-test.invalid"
        got, _ = await exchange(fport, f"GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 502 ") and b"resolve" in got, got[:200]
        got, _ = await exchange(fport, f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 502 "), got[:200]
        socks = b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + b"\x01\xbb"
        got, closed = await exchange(fport, socks, seconds=5.0)
        assert closed and got[:2] == b"\x05\x00" and got[2:4] == b"\x05\x04", got  # 0x04 host unreachable
        port = web.getHost().port
        got, _ = await exchange(fport, f"GET http://127.0.0.1:{port}/blob?n=10 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        assert split_response(got)[2] == pattern(10)
        assert {"upstream.wmproxy-test.invalid", name} <= set(resolver.asked)
    finally:
        reactor.installNameResolver(old)
        await _stop(rev, fwd, web)


# ------------------------------------------------------------------------- tunnel link cut silently

class Blackhole(Protocol):
    """One side of a TCP relay that can be told to swallow everything silently (a cut link)."""

    peer: Optional["Blackhole"] = None
    pending = b""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        if self.relay.cut:
            return
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.relay.cut and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class Relay:
    """127.0.0.1:0 → target; ``cut = True`` drops every byte both ways without closing anything."""

    def __init__(self, target: int) -> None:
        self.cut = False
        self.target = target
        self.conns: list[Blackhole] = []
        relay = self

        class Front(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Blackhole:
                front = Blackhole(relay)
                back = Blackhole(relay)
                front.peer, back.peer = back, front
                relay.conns += [front, back]
                from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

                def linked(_p: Any) -> None:
                    if front.pending:
                        back.transport.write(front.pending)
                        front.pending = b""

                connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.target), back).addCallbacks(
                    linked, lambda _f: front.transport.loseConnection())
                return front

        self.port = reactor.listenTCP(0, Front(), interface="127.0.0.1")

    def stopListening(self) -> Any:
        for c in self.conns:
            if c.transport is not None:
                c.transport.abortConnection()
        return self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tunnel_link_cut_silently_both_ends_notice_within_heartbeat_timeout() -> None:
    """The link between tunnel client and server goes silent (a relay swallows every byte, nothing is
    closed): the client declares the session dead within heartbeat_timeout and the server frees the
    domain (public requests 502); when the link works again the client reconnects and serves."""
    beats = 'heartbeat_interval = "200ms"\nheartbeat_timeout = "800ms"\n'
    web = tagged_origin("W")
    srv = await tunnel_server(beats)
    server = feature(srv, TunnelServer)
    relay = Relay(port_of(srv, "tunnel server"))
    cli = await start_proxy(textwrap.dedent(f"""\
        [proxy]
        server = "127.0.0.1:{relay.port.getHost().port}"
        token = "good-token"
        """) + beats + mapping("web", "http", web.getHost().port, domain="w.test"))
    client = feature(cli, TunnelClient)
    http = port_of(srv, "tunnel http")

    def published() -> bool:
        return server.registry.find("http", "w.test") is not None

    try:
        await until(published, timeout=10)
        got, _ = await exchange(http, _get("/a", "w.test", close=True))
        assert split_response(got)[2] == b"W /a"
        first = client.conn
        relay.cut = True
        cut_at = reactor.seconds()
        await until(lambda: client.conn is not first, timeout=3.0)
        client_noticed = reactor.seconds() - cut_at
        await until(lambda: not published(), timeout=3.0)
        server_noticed = reactor.seconds() - cut_at
        bound = 0.8 + 0.2 + 0.5  # heartbeat_timeout, one check interval, scheduling on a busy machine
        assert client_noticed <= bound and server_noticed <= bound, (client_noticed, server_noticed)
        got, _ = await exchange(http, _get("/b", "w.test", close=True))
        assert got.startswith(b"HTTP/1.1 502 "), got[:100]

        relay.cut = False  # the link heals: the next reconnect attempt gets through
        await until(published, timeout=10)
        got, _ = await exchange(http, _get("/c", "w.test", close=True))
        assert split_response(got)[2] == b"W /c"
    finally:
        await _stop(cli, srv, relay, web)


# ---------------------------------------------------------------------- unwritable access log

@pytest_twisted.ensureDeferred
async def test_access_log_on_a_full_disk_or_unopenable_path_warns_once_and_serves(tmp_path: Path) -> None:
    """access log on /dev/full (every write fails with ENOSPC) and on a path that became a folder
    (open fails): each problem is logged once, at warn, and every request is still answered."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    later = tmp_path / "logs" / "access.log"
    svc = await start_proxy(textwrap.dedent(f"""
        [http]
        [http.log_names]
        full = "/dev/full info"
        gone = "{later} info"
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        [[http.server.location]]
        rule = "/full"
        static_response = "full ok"
        access_log = "full"
        [[http.server.location]]
        rule = "/gone"
        static_response = "gone ok"
        access_log = "gone"
    """))
    later.mkdir(parents=True)  # after start-up: the file path is now a folder
    port = bound_port(svc)
    try:
        with Logs() as logs:
            for _ in range(5):
                await still_serves(port, "/full", b"full ok")
                await still_serves(port, "/gone", b"gone ok")
        full = logs.matching("/dev/full")
        gone = logs.matching(str(later))
        assert len(full) == 1 and "No space left" in full[0], full
        assert len(gone) == 1 and "cannot open" in gone[0], gone
    finally:
        await _stop(svc)


# ---------------------------------------------------------------- files changed while being served

class SlowReader(RawClient):
    """A client that stops reading after the first bytes until :meth:`go` is called."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not getattr(self, "released", False):
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.first.callback(None) if not self.first.called else None

    def go(self) -> None:
        self.released = True
        self.transport.resumeProducing()  # type: ignore[union-attr]


async def serve_while(port: int, path: str, change: Callable[[], None],
                      headers: str = "") -> tuple[int, dict[str, str], bytes, bool]:
    """GET ``path``, pause after the first bytes, run ``change()``, read to the end:
    (status, fields, body, closed by the server)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    c = SlowReader()
    c.first = defer.Deferred()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), c)
    c.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())  # type: ignore[union-attr]
    await c.first.addTimeout(5, reactor)
    change()
    c.go()
    closed = True
    try:
        await c.closed.addTimeout(20.0, reactor)
    except defer.TimeoutError:
        closed = False
        c.transport.abortConnection()  # type: ignore[union-attr]
    status, fields, body = split_response(c.buf)
    return status, fields, body, closed


@pytest_twisted.ensureDeferred
async def test_file_deleted_or_truncated_while_served(tmp_path: Path) -> None:
    """file_server: a file deleted mid-transfer is sent whole (the open file keeps its bytes); one
    truncated mid-transfer ends in a close with fewer bytes than Content-Length; a text file gzipped
    on the fly and truncated ends without the terminating chunk. Never a 500, and it keeps serving."""
    root = tmp_path / "www"
    root.mkdir()
    size = 8 * 1024 * 1024  # well beyond what socket buffers hold while the reader pauses
    data = pattern(size)
    (root / "deleted.bin").write_bytes(data)
    (root / "truncated.bin").write_bytes(data)
    text = random.Random(9).randbytes(size // 2).hex().encode()  # text that gzip only halves
    (root / "truncated.txt").write_bytes(text)
    (root / "small.txt").write_text("small and fine\n")
    os.utime(root / "small.txt", (0, 0))
    svc = await start_proxy(textwrap.dedent(f"""
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        [[http.server.location]]
        file_server = {{ root = "{root}" }}
    """))
    port = bound_port(svc)
    try:
        status, fields, body, closed = await serve_while(port, "/deleted.bin", (root / "deleted.bin").unlink,
                                                         "Connection: close\r\n")
        assert status == 200 and int(fields["content-length"]) == size
        assert len(body) == size and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()

        def truncate(name: str) -> Callable[[], None]:
            return lambda: os.truncate(root / name, 1024)

        status, fields, body, closed = await serve_while(port, "/truncated.bin", truncate("truncated.bin"))
        assert status == 200 and int(fields["content-length"]) == size
        assert closed and len(body) < size and body == data[:len(body)]

        status, fields, body, closed = await serve_while(port, "/truncated.txt", truncate("truncated.txt"),
                                                         "Accept-Encoding: gzip\r\n")
        assert status == 200 and fields["content-encoding"] == "gzip" and fields["transfer-encoding"] == "chunked"
        _payload, terminated = dechunk(body)
        assert closed and not terminated and not body.endswith(b"0\r\n\r\n")

        got, _ = await exchange(port, _get("/small.txt", close=True))
        assert split_response(got)[2] == b"small and fine\n"
        assert not re.search(rb"HTTP/1.1 5\d\d", got)
    finally:
        await _stop(svc)
