"""``bind_mode = "tcp"``: each accepted connection relayed to a group member.

One :class:`StreamProtocol` per client, independent of every other: it pauses
the client, dials a member (:func:`wmproxy_tw.balance.dial.dial`: load
balancing, passive health, the next member on a connect failure), writes the
PROXY header first when configured, then hands both transports to the one
relay (:class:`wmproxy_tw.relay.Splice`: producers both ways, half-close,
idle timeout).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..balance.dial import ClientDial
from ..balance.interfaces import IUpstreamSelector
from ..balance.selector import Member
from ..config.model import StreamServer
from ..connect import UpstreamError, quiet_factory
from ..proxyproto import build_header
from ..relay import A, B, Splice, SpliceProtocol

__all__ = ["StreamFactory", "StreamProtocol", "UpstreamLeg", "peer_pair"]

_log = Logger()


def peer_pair(transport: Any) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """(client address, the address it reached) of a server-side transport, for a PROXY header."""
    peer, host = transport.getPeer(), transport.getHost()
    src = (peer.host, peer.port) if hasattr(peer, "host") else None
    dst = (host.host, host.port) if hasattr(host, "host") else None
    return src, dst


class UpstreamLeg(SpliceProtocol):
    """The upstream side of a relay; writes ``preamble`` (a PROXY header) before anything else."""

    transport: Any

    def __init__(self, splice: Splice, side: int, preamble: bytes = b"") -> None:
        super().__init__(splice, side)
        self.preamble = preamble

    def connectionMade(self) -> None:
        if self.preamble:
            self.transport.write(self.preamble)
        super().connectionMade()


class StreamFactory(Factory):
    """Builds one :class:`StreamProtocol` per accepted client of one ``[[stream.server]]``."""

    noisy = False

    def __init__(self, reactor: Any, cfg: StreamServer, group: IUpstreamSelector) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.group = group
        self.active: set[StreamProtocol] = set()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        proto = StreamProtocol(self)
        proto.factory = self
        return proto


@implementer(IHalfCloseableProtocol)
class StreamProtocol(Protocol):
    """One client of a TCP stream server."""

    transport: Any

    def __init__(self, factory: StreamFactory) -> None:
        self.f = factory
        self.splice = Splice(factory.reactor, idle_timeout=factory.cfg.client_timeout, on_done=self._done)
        self.upstream: ClientDial | None = None
        self.closed = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # the PROXY header's client when a trusted front sent one
        self.client = getattr(peer, "host", "?")
        cfg = self.f.cfg
        if not cfg.admits(self.client):
            _log.info("stream: {client} refused by allow_ip/deny_ip", client=self.client)
            self.transport.abortConnection()
            return
        self.f.active.add(self)
        self.splice.attach(A, self.transport)  # held paused until the upstream leg is attached
        preamble = b""
        if cfg.send_proxy_protocol:
            preamble = build_header(cfg.send_proxy_protocol, *peer_pair(self.transport))

        def factory_for(_m: Member) -> Factory:
            return quiet_factory(lambda: UpstreamLeg(self.splice, B, preamble))

        self.upstream = ClientDial(self.f.reactor, self.f.group, factory_for, key=self.client,
                                   timeout=cfg.proxy_connect_timeout, gone=lambda: self.closed, failed=self._failed)

    def _failed(self, err: UpstreamError) -> None:
        _log.info("stream: {client} → upstream {group}: {why}", client=self.client,
                  group=self.f.group.name, why=err.reason)
        if not self.closed:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.splice.received(A, data)

    def readConnectionLost(self) -> None:
        self.splice.read_closed(A)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.f.active.discard(self)
        if self.upstream is not None:
            self.upstream.cancel()
        self.splice.lost(A, reason)

    def _done(self, _splice: Splice) -> None:
        if self.upstream is not None:
            self.upstream.release()
