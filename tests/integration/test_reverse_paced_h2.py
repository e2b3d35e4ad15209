"""The reverse pipeline's loose ends: rate_limit on a spliced WebSocket; HTTP/2 request bodies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from wmproxy_tw.reverse import http2

from ..helpers import bound_port, origin, pattern, run, run_input, start_proxy
from ..tlsutil import make_cert
from .revutil import raw

pytestmark = pytest.mark.integration

WS_PAYLOAD = 1024 * 1024


class FloodingWsOrigin(Protocol):
    """Answers any request head with a 101, then sends WS_PAYLOAD bytes at once."""

    head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.head.endswith(b"\r\n\r\n"):
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = self.head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n" + b"w" * WS_PAYLOAD)


@pytest_twisted.ensureDeferred
async def test_rate_limit_paces_a_spliced_websocket() -> None:
    """rate_limit = 64k/s: after the 101, the upstream's 1 MiB reaches the client at the paced rate
    (in a one-second window, at most a few reads of 64 KiB: far less than all of it)."""
    ws = reactor.listenTCP(0, Factory.forProtocol(FloodingWsOrigin), interface="127.0.0.1")
    svc = await start_proxy(f"""
[[http.server]]
bind_addr = "127.0.0.1:0"
[[http.server.location]]
rule = "@ws"
is_ws = true
rate_limit = "64k/s"
proxy_url = "http://127.0.0.1:{ws.getHost().port}"
""")
    hello = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    try:
        got = await raw(bound_port(svc), hello, timeout=1.0)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), got[:200]
        assert 0 < len(body) < WS_PAYLOAD // 2, len(body)  # unpaced, all of it arrives at once
        assert set(body) == {ord("w")}
    finally:
        await svc.stopService()
        await defer.maybeDeferred(ws.stopListening)


needs_h2 = pytest.mark.skipif(not http2.h2_available() or shutil.which("curl") is None, reason="needs h2 and curl")
CURL_H2 = ["curl", "--http2", "-k", "-sS", "--max-time", "60"]


async def h2_proxy(tmp_path: Path, web: Any, server: str = "", locations: str = "") -> tuple[Any, str]:
    """An ``http2 = true`` TLS server proxying ``/`` to ``web`` (``server``/``locations``: extra lines);
    returns (service, its https base URL)."""
    cert, key = make_cert(tmp_path, "h2.test")
    to = f'proxy_url = "http://127.0.0.1:{web.getHost().port}"'
    svc = await start_proxy(f"""
[[http.server]]
bind_ssl = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
http2 = true
{server}
{locations.format(to=to)}
[[http.server.location]]
rule = "/"
{to}
""")
    return svc, f"https://127.0.0.1:{bound_port(svc)}"


@needs_h2
@pytest_twisted.ensureDeferred
async def test_http2_request_bodies_are_proxied_byte_for_byte(tmp_path: Path) -> None:
    """curl --http2 POST bodies (small with CR/LF/NUL bytes, 3 MiB, and one of unknown length)
    through an http2 = true TLS server come back from the origin's echo identical; over
    client_max_body_size, 413."""
    web = origin()
    svc, base = await h2_proxy(tmp_path, web, locations='[[http.server.location]]\nrule = "/small"\n'
                                                        'client_max_body_size = "100k"\n{to}')
    url, small_url = f"{base}/echo", f"{base}/small"
    small = tmp_path / "small.bin"
    small.write_bytes(b"line one\r\nline two\n\x00\xff" * 50)
    large = tmp_path / "large.bin"
    large.write_bytes(pattern(3 * 1024 * 1024 + 17))
    try:
        for body in (small, large):
            got = tmp_path / "got.bin"
            out, err, code = await run(*CURL_H2, "-o", str(got), "-w", "%{http_version} %{http_code}", "--data-binary", f"@{body}", url)
            assert code == 0 and out == b"2 200", (out, err)
            assert got.read_bytes() == body.read_bytes(), (body.name, got.stat().st_size)
        # from stdin: no content-length, the body ends with the stream (END_STREAM)
        data = pattern(200_000)
        out, err, code = await run_input([*CURL_H2, "-X", "POST", "-T", "-", "-w", "\n%{http_version} %{http_code}",
                                          url], data)
        assert code == 0 and out == data + b"\n2 200", (out[-40:], err)
        # over client_max_body_size: 413, whether the length is declared or not
        out, err, code = await run(*CURL_H2, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                                   "--data-binary", f"@{large}", small_url)
        assert code == 0 and out == b"2 413", (out, err)
        out, err, code = await run_input([*CURL_H2, "-X", "POST", "-T", "-", "-o", "/dev/null",
                                          "-w", "%{http_version} %{http_code}", small_url], data)
        assert code == 0 and out == b"2 413", (out, err)
    finally:
        await svc.stopService()
        await defer.maybeDeferred(web.stopListening)


@needs_h2
@pytest_twisted.ensureDeferred
async def test_http2_body_over_the_limit_is_refused_without_buffering_it(tmp_path: Path) -> None:
    """client_max_body_size = 1m on an HTTP/2 server: a 16 MiB upload (declared or of unknown length)
    gets 413 long before it is all sent (not buffered whole), and the connection serves the next request."""
    web = origin()
    svc, base = await h2_proxy(tmp_path, web, server='client_max_body_size = "1m"')
    url = f"{base}/echo"
    big = tmp_path / "big.bin"
    big.write_bytes(pattern(16 * 1024 * 1024))
    curl = [*CURL_H2, "-w", "%{http_code} %{size_upload}\n"]
    try:
        # the second request (--next) reuses the connection: it must still flow
        out, err, code = await run(*curl, "-o", "/dev/null", "--data-binary", f"@{big}", url,
                                   "--next", *curl[1:], "--data-binary", "after", url)
        assert code == 0, err
        first, second = out.split(b"\n", 1)
        status, sent = first.split()
        assert status == b"413" and int(sent) < 4 * 1024 * 1024, out
        assert second == b"after200 5\n", out
        out, err, code = await run_input([*curl, "-o", "/dev/null", "-X", "POST", "-T", "-", url],
                                         big.read_bytes())
        status, sent = out.split()
        assert code == 0 and status == b"413" and int(sent) < 4 * 1024 * 1024, (out, err)
    finally:
        await svc.stopService()
        await defer.maybeDeferred(web.stopListening)
