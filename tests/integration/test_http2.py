"""HTTP/2 over TLS via ALPN (Twisted's H2 support) and the flood limits it keeps."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from wmproxy_tw.config.model import FileServer
from wmproxy_tw.listen import StartupError
from wmproxy_tw.reverse import http2
from wmproxy_tw.reverse.files import file_site
from wmproxy_tw.tls import client_creator, server_creator

from ..filetree import make_tree
from ..helpers import run
from ..tlsutil import make_cert

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not http2.h2_available(), reason="twisted[http2] (h2, priority) not installed"),
]


def tls_site(folder: Path, root: Path, h2: bool = True) -> Any:
    """Serve ``root`` over TLS on 127.0.0.1:0 the way an ``http2 = true`` server does:
    a twisted.web Site behind our server_creator offering ALPN h2 (+ http/1.1)."""
    pair = make_cert(folder, "h2.test")
    site = file_site(FileServer(), str(root), reactor)
    factory = TLSMemoryBIOFactory(server_creator([pair], alpn=http2.alpn_for(h2)), False, site)
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by `make test-deps`")
@pytest_twisted.ensureDeferred
async def test_curl_http2_gets_h2(tmp_path: Path) -> None:
    """curl --http2 gets HTTP/2 (and the file) when h2 is offered, HTTP/1.1 when it is not."""
    root = make_tree(tmp_path)
    for h2_on, expected in ((True, "2"), (False, "1.1")):
        port = tls_site(tmp_path, root, h2_on)
        try:
            out, err, code = await run("curl", "--http2", "-k", "-s", "--max-time", "10", "-w", " %{http_version}",
                                       f"https://127.0.0.1:{port.getHost().port}/a.txt")
            assert code == 0, err
            assert out == b"hello world\n " + expected.encode()
        finally:
            await defer.maybeDeferred(port.stopListening)


class H2Client(Protocol):
    """A raw HTTP/2 client (hyper-h2) that records what the server does."""

    def __init__(self, attack: Any) -> None:
        self.attack = attack
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list[Any] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.attack(self.conn)
        self.transport.write(self.conn.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        try:
            self.events.extend(self.conn.receive_data(data))
        except h2.exceptions.ProtocolError:
            self.transport.loseConnection()
            return
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)
        if self.goaway() is not None:
            self.transport.loseConnection()  # as a well-behaved client does after GOAWAY

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def goaway(self) -> Any:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)


async def _attack(tmp_path: Path, attack: Any) -> H2Client:
    """Serve a tree over TLS with h2, run ``attack(h2conn)`` from a raw client, return it once closed."""
    port = tls_site(tmp_path, make_tree(tmp_path))
    try:
        ep = wrapClientTLS(client_creator("h2.test", verify=False, alpn=[b"h2"]),
                           TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        proto: H2Client = await ep.connect(Factory.forProtocol(lambda: H2Client(attack)))
        timeout = reactor.callLater(10, proto.transport.abortConnection)
        await proto.closed
        if timeout.active():
            timeout.cancel()
        return proto
    finally:
        await defer.maybeDeferred(port.stopListening)


HEADERS = [(":method", "GET"), (":path", "/a.txt"), (":scheme", "https"), (":authority", "h2.test")]


@pytest_twisted.ensureDeferred
async def test_rapid_reset_flood_gets_goaway(tmp_path: Path) -> None:
    """2000 streams opened and reset at once (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM, then close."""
    def rapid_reset(conn: Any) -> None:
        for i in range(2000):
            sid = 2 * i + 1
            conn.send_headers(sid, HEADERS, end_stream=True)
            conn.reset_stream(sid)

    client = await _attack(tmp_path, rapid_reset)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest_twisted.ensureDeferred
async def test_too_many_concurrent_streams_closes(tmp_path: Path) -> None:
    """Opening more than the advertised 100 concurrent streams ends the connection (GOAWAY PROTOCOL_ERROR)."""
    def many_streams(conn: Any) -> None:
        conn.local_settings.max_concurrent_streams = 1000  # pretend; the server's limit still applies
        conn.remote_settings.max_concurrent_streams = 1000
        for i in range(300):
            conn.send_headers(2 * i + 1, HEADERS, end_stream=False)  # left open: no END_STREAM

    client = await _attack(tmp_path, many_streams)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert goaway.last_stream_id <= 2 * 100 + 1  # no stream beyond the 100th was accepted


def test_check_http2() -> None:
    """http2 = true: fine on TLS, a warning without TLS; ALPN lists h2 first only when enabled."""
    assert http2.check_http2("http.server[0]", True, tls=True) == []
    assert http2.check_http2("http.server[0]", False, tls=False) == []
    assert "bind_ssl" in http2.check_http2("http.server[0]", True, tls=False)[0]
    assert http2.alpn_for(True) == (b"h2", b"http/1.1") and http2.alpn_for(False) == (b"http/1.1",)
    assert StartupError  # the error raised when h2 is missing
