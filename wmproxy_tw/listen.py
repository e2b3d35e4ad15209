"""The listener registry: bind once per address, fail loudly, swap on reload.

Each bound socket is given a :class:`Dispatch` factory whose ``target`` is the
feature's current factory; a reload replaces the target and keeps the socket,
so no connection is refused while the configuration changes.  Open
connections keep the protocol (and so the configuration) they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.application import service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger

from .config.grammar import Address

__all__ = ["StartupError", "Dispatch", "Listener", "ListenerRegistry"]

_log = Logger()


class StartupError(Exception):
    """A listener could not start: the one line an operator is shown."""


class Dispatch(Factory):
    """A stable factory for a socket whose feature factory can be replaced.

    It also counts open connections and enforces ``max_connections``: a
    connection over the cap is closed at once.
    """

    noisy = False

    def __init__(self, target: IProtocolFactory, max_connections: Optional[int] = None) -> None:
        self.target = target
        self.max_connections = max_connections
        self.open = 0
        self.accepted = 0
        self.refused = 0

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.max_connections is not None and self.open >= self.max_connections:
            self.refused += 1
            return None
        proto = self.target.buildProtocol(addr)
        if proto is None:
            return None
        self.open += 1
        self.accepted += 1
        lost = proto.connectionLost

        def counted(reason: Any = None, _lost: Any = lost) -> None:
            self.open -= 1
            _lost(reason)

        proto.connectionLost = counted  # type: ignore[method-assign]
        return proto


@dataclass
class Listener:
    """One bound socket and what it serves."""

    kind: str  # "tcp" | "udp"
    addr: Address
    name: str
    port: IListeningPort
    dispatch: Optional[Dispatch] = None
    udp: Optional[DatagramProtocol] = None
    connections: set[Any] = field(default_factory=set)

    @property
    def bound(self) -> Address:
        h = self.port.getHost()
        return Address(getattr(h, "host", self.addr.host), getattr(h, "port", self.addr.port))


class ListenerRegistry(service.Service):
    """All listening sockets of the process, keyed by (kind, address)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.listeners: dict[tuple[str, Address], Listener] = {}

    def bind_tcp(self, addr: Address, factory: IProtocolFactory, name: str,
                 max_connections: Optional[int] = None, backlog: int = 1024) -> Listener:
        """Listen on ``addr``, or raise :class:`StartupError` with one clear line."""
        key = ("tcp", addr)
        if key in self.listeners and addr.port != 0:
            raise StartupError(f"{name}: {addr} is already used by {self.listeners[key].name}")
        dispatch = Dispatch(factory, max_connections)
        try:
            port = self.reactor.listenTCP(addr.port, dispatch, backlog=backlog, interface=addr.host)
        except error.CannotListenError as e:
            raise StartupError(f"{name}: cannot listen on {addr}: {_why(e)}") from None
        listener = Listener("tcp", addr, name, port, dispatch=dispatch)
        if addr.port == 0:  # several "any port" listeners: key each by the port it got
            key = ("tcp", listener.bound)
        self.listeners[key] = listener
        _log.info("{name} listening on {addr}", name=name, addr=str(listener.bound))
        return listener

    def bind_udp(self, addr: Address, proto: DatagramProtocol, name: str) -> Listener:
        key = ("udp", addr)
        if key in self.listeners:
            raise StartupError(f"{name}: udp {addr} is already used by {self.listeners[key].name}")
        try:
            port = self.reactor.listenUDP(addr.port, proto, interface=addr.host, maxPacketSize=65535)
        except error.CannotListenError as e:
            raise StartupError(f"{name}: cannot listen on udp {addr}: {_why(e)}") from None
        listener = Listener("udp", addr, name, port, udp=proto)
        self.listeners[key] = listener
        _log.info("{name} listening on udp {addr}", name=name, addr=str(listener.bound))
        return listener

    def find(self, kind: str, addr: Address) -> Optional[Listener]:
        return self.listeners.get((kind, addr))

    def close(self, kind: str, addr: Address) -> Deferred[Any]:
        listener = self.listeners.pop((kind, addr), None)
        if listener is None:
            d: Deferred[Any] = Deferred()
            d.callback(None)
            return d
        return _maybe_deferred(listener.port.stopListening())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ds = [self.close(kind, addr) for (kind, addr) in list(self.listeners)]
        return DeferredList(ds)


def _maybe_deferred(value: Any) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


def _why(e: error.CannotListenError) -> str:
    sock = getattr(e, "socketError", None)
    if sock is not None and getattr(sock, "strerror", None):
        return str(sock.strerror).lower()
    return str(e)
