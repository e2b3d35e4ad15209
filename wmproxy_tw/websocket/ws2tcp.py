"""``bind_mode = "ws2tcp"``: accept WebSocket, carry it to a TCP upstream.

An autobahn server on ``bind_addr``.  The opening handshake is answered only
once the upstream is connected, so an unreachable upstream is a ``502``/``504``
answer, not an open-then-close.  Optional checks: ``path`` (else ``404``) and
``domain`` against the Host header (else ``403``).  websockify's clients offer
the ``binary`` subprotocol: it is selected when offered; otherwise no
subprotocol is chosen (we never invent one), which plain RFC 6455 clients
(websocat, browsers without a protocol list) expect.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..balance.dial import Dialed, dial
from ..balance.interfaces import IUpstreamSelector
from ..balance.selector import Member
from ..config.model import StreamServer
from ..connect import UpstreamError
from ..proxyproto import build_header
from .bridge import (
    CLOSED,
    MAX_HANDSHAKE,
    Bridge,
    BridgeTcpProtocol,
    BridgeWsMixin,
    apply_limits,
)
from .tcp2ws import OneProtocolFactory

__all__ = ["SUBPROTOCOLS", "Ws2TcpFactory", "Ws2TcpProtocol"]

_log = Logger()

SUBPROTOCOLS = ("binary",)  # websockify's; chosen only when the client offers it


# (autobahn's two bases disagree on ``peer``/``_transport_details``: see tcp2ws.WsClientProtocol)
class Ws2TcpProtocol(BridgeWsMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One WebSocket client of a ws2tcp server."""

    transport: Any

    factory: Ws2TcpFactory
    _dialing: Deferred[Dialed] | None = None
    _dialed: Dialed | None = None

    def _handshake_too_large(self) -> None:
        self.failHandshake(f"request head over {MAX_HANDSHAKE} bytes", 431)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # once answered (e.g. 431 while the upstream was being dialled), the connection is
        # closing: the dial's outcome must not write a second HTTP response after the first
        if self.state == CLOSED:
            return
        super().failHandshake(reason, code, responseHeaders)

    # autobahn takes a Deferred here too (txaio.as_future), which its annotation leaves out
    def onConnect(self, request: ConnectionRequest) -> Deferred[str | None]:  # type: ignore[override]
        f = self.factory
        cfg = f.cfg
        peer, host = self.transport.getPeer(), self.transport.getHost()
        if not cfg.admits(getattr(peer, "host", "")):
            raise ConnectionDeny(403, "Forbidden")
        if cfg.path and request.path != cfg.path:
            raise ConnectionDeny(404, "Not Found")
        if cfg.domain and request.host.lower().rstrip(".") != cfg.domain.lower().rstrip("."):
            raise ConnectionDeny(403, "Forbidden host")
        chosen = next((p for p in request.protocols if p in SUBPROTOCOLS), None)
        bridge = Bridge(f.reactor, cfg.client_timeout, cfg.max_message_size, on_done=self._done)
        self.bridge = bridge
        preamble = b""
        if cfg.send_proxy_protocol:
            preamble = build_header(cfg.send_proxy_protocol, (peer.host, peer.port), (host.host, host.port))

        def factory_for(_m: Member) -> OneProtocolFactory:
            return OneProtocolFactory(lambda: BridgeTcpProtocol(bridge, preamble))

        self._hold_input = True
        d = dial(f.reactor, f.group, factory_for, key=getattr(peer, "host", None),
                 timeout=cfg.proxy_connect_timeout)
        self._dialing = d

        def connected(dialed: Dialed) -> str | None:
            self._dialing = None
            self._dialed = dialed
            self._hold_input = False
            if self.state == CLOSED:  # the client left while we connected
                dialed.close()
                raise ConnectionDeny(499, "client closed")
            return chosen

        def failed(fail: Failure) -> None:
            self._dialing = None
            self._hold_input = False
            err = UpstreamError.of(fail)
            if self.state != CLOSED:
                _log.info("ws2tcp: {client} → upstream {group}: {why}", client=peer.host,
                          group=f.group.name, why=err.reason)
            raise ConnectionDeny(err.status, "Bad Gateway" if err.status == 502 else "Gateway Timeout")

        return d.addCallbacks(connected, failed)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._dialing is not None:
            d, self._dialing = self._dialing, None
            d.cancel()
        super().onClose(wasClean, code, reason)

    def _done(self, _bridge: Bridge) -> None:
        if self._dialed is not None:
            self._dialed.release()


class Ws2TcpFactory(WebSocketServerFactory):
    """The autobahn server of one ws2tcp ``[[stream.server]]``."""

    protocol = Ws2TcpProtocol  # type: ignore[assignment]  # autobahn's factories are not generic over the protocol

    def __init__(self, reactor: Any, cfg: StreamServer, group: IUpstreamSelector) -> None:
        super().__init__(reactor=reactor, server="wmproxy-tw")
        self.cfg = cfg
        self.group = group
        apply_limits(self, cfg, reactor)
