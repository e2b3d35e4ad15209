"""The reverse pipeline's loose ends: rate_limit on a spliced WebSocket; HTTP/2 request bodies."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from ..helpers import bound_port, start_proxy
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
