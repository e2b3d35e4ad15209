"""``bind_mode = "tcp2ws" | "tcp2wss"``: accept TCP, carry it over a WebSocket.

Each accepted TCP connection dials a member of the target group (the
``proxy_url`` host, or the ``up_name`` group) and opens an autobahn WebSocket
client on it: ``GET <proxy_url path>`` with ``Host: <domain or URL host>``;
over TLS (``wss://`` or ``tcp2wss``) verified against ``domain`` or the URL's
host by :func:`wmproxy_tw.tls.client_creator`.  No subprotocol is requested.
Then the :class:`~wmproxy_tw.websocket.bridge.Bridge` carries each TCP read
as one binary message, and every received message (binary or text) to TCP.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ..balance.build import Target
from ..balance.dial import ClientDial
from ..balance.interfaces import IUpstreamSelector
from ..balance.selector import Member
from ..config.model import StreamServer
from ..connect import UpstreamError
from .bridge import Bridge, BridgeTcpProtocol, BridgeWsMixin, apply_limits

__all__ = ["OneProtocolFactory", "Tcp2WsFactory", "Tcp2WsProtocol", "WsClientFactory", "WsClientProtocol", "WsUrl",
           "ws_url"]

_log = Logger()


@dataclass(frozen=True)
class WsUrl:
    """What the opening handshake says: Host (name and port), resource; and the TLS name."""

    secure: bool
    host: str  # for the Host header (IPv6 in brackets)
    port: int
    resource: str
    tls_name: str  # for SNI and certificate verification

    def __str__(self) -> str:
        default = 443 if self.secure else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{'wss' if self.secure else 'ws'}://{self.host}{port}{self.resource}"


_AUTHORITY = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+))(?::(?P<port>\d+))?$")


def ws_url(target: Target, domain: str | None, force_tls: bool = False) -> WsUrl:
    """The handshake's view of ``proxy_url`` (``domain``, when set, is the Host and TLS name)."""
    secure = force_tls or target.scheme == "wss"
    m = _AUTHORITY.match(target.host_header)
    if m is None:
        raise ValueError(f"cannot read a host from {target.host_header!r}")
    name = m.group("v6") or m.group("host")
    port = int(m.group("port")) if m.group("port") else (443 if secure else 80)
    if domain:
        name = domain
    host = f"[{name}]" if ":" in name else name
    return WsUrl(secure, host, port, target.path or "/", name)


class OneProtocolFactory(Factory):
    """A client factory that hands out protocols built elsewhere (keeps their own ``factory``)."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.build()


# autobahn's own two bases (the Twisted adapter and the core protocol) annotate
# ``peer``/``_transport_details`` differently; mypy reports it on every subclass.
class WsClientProtocol(BridgeWsMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """The WebSocket client of one tcp2ws connection."""

    transport: Any
    factory: WsClientFactory

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.bridge is not None:
            self.bridge.ws_made(self)

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        return self.factory.request


class WsClientFactory(WebSocketClientFactory):
    """autobahn's client factory, limited, opening every connection with ``request``."""

    protocol = WsClientProtocol  # type: ignore[assignment]  # autobahn's factories are not generic over the protocol

    def __init__(self, reactor: Any, cfg: StreamServer, request: ConnectingRequest) -> None:
        super().__init__(reactor=reactor, useragent=request.useragent)
        self.request = request
        apply_limits(self, cfg, reactor)

    def client(self, bridge: Bridge) -> WsClientProtocol:
        """A protocol for one connection, joined to ``bridge``."""
        proto = WsClientProtocol()
        proto.factory = self
        proto.bridge = bridge
        return proto


class Tcp2WsFactory(Factory):
    """Builds one :class:`Tcp2WsProtocol` per accepted TCP client of one ``[[stream.server]]``."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        cfg: StreamServer,
        group: IUpstreamSelector,
        url: WsUrl,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.group = group
        self.url = url
        self.tls = tls
        self.ws_factory = WsClientFactory(reactor, cfg, ConnectingRequest(
            host=url.host, port=url.port, resource=url.resource, useragent="wmproxy-tw"))

    def buildProtocol(self, addr: Any) -> Protocol | None:
        proto = Tcp2WsProtocol(self)
        proto.factory = self
        return proto


class Tcp2WsProtocol(BridgeTcpProtocol):
    """One accepted TCP client: dial, open the WebSocket, bridge."""

    def __init__(self, factory: Tcp2WsFactory) -> None:
        self.f = factory
        cfg = factory.cfg
        super().__init__(Bridge(factory.reactor, cfg.client_timeout, cfg.max_message_size, on_done=self._done))
        self.upstream: ClientDial | None = None

    def connectionMade(self) -> None:
        self.client = getattr(self.transport.getPeer(), "host", "?")
        if not self.f.cfg.admits(self.client):
            _log.info("tcp2ws: {client} refused by allow_ip/deny_ip", client=self.client)
            self.transport.abortConnection()
            return
        super().connectionMade()  # paused until the WebSocket is open
        self.upstream = ClientDial(self.f.reactor, self.f.group, self._factory_for, key=self.client,
                                   timeout=self.f.cfg.proxy_connect_timeout,
                                   gone=lambda: self.bridge.finished, failed=self._failed)

    def _factory_for(self, _member: Member) -> IProtocolFactory:
        inner = OneProtocolFactory(lambda: self.f.ws_factory.client(self.bridge))
        if self.f.tls is None:
            return inner
        tls = TLSMemoryBIOFactory(self.f.tls, True, inner)
        tls.noisy = False
        return tls

    def _failed(self, err: UpstreamError) -> None:
        _log.info("tcp2ws: {client} → {url}: {why}", client=self.client, url=str(self.f.url), why=err.reason)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.upstream is not None:
            self.upstream.cancel()
        super().connectionLost(reason)

    def _done(self, _bridge: Bridge) -> None:
        if self.upstream is not None:
            self.upstream.release()
