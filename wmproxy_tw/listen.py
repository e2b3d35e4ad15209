"""The listener registry: bind once per address, fail loudly, swap on reload.

Each bound socket is given a :class:`Dispatch` factory (TCP) or a
:class:`UdpDispatch` protocol (UDP) whose ``target`` is the feature's current
factory or protocol.  A reload replaces the target and keeps the socket, so
no connection is refused while the configuration changes; connections
already open keep the protocol (and so the configuration) they started with.

The dispatch also tracks its open connections, which is what ``/status``
counts, what a graceful stop waits for (:meth:`ListenerRegistry.idle`) and
what it aborts when ``shutdown_timeout`` has passed.  A listener that is
closed (removed by a reload, or at stop) is *retired*: its socket is gone
but its connections are still tracked until they end.

With ``reuse_port=True`` (worker processes, see
:mod:`wmproxy_tw.control.supervisor`) sockets are created with
``SO_REUSEPORT`` and adopted by the reactor, so several processes share each
address and the kernel spreads connections between them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger

from .config.grammar import Address
from .feature import ListenSpec

__all__ = ["StartupError", "Dispatch", "UdpDispatch", "Listener", "ListenerRegistry", "ListenerDiff", "diff"]

_log = Logger()

Key = tuple[str, Address]


class StartupError(Exception):
    """A listener could not start: the one line an operator is shown."""


class Dispatch(Factory):
    """A stable factory for a socket whose feature factory can be replaced.

    It tracks open connections and enforces ``max_connections``: a
    connection over the cap is closed at once.
    """

    noisy = False

    def __init__(self, target: IProtocolFactory, max_connections: Optional[int] = None) -> None:
        self.target = target
        self.max_connections = max_connections
        self.protocols: set[Any] = set()
        self.accepted = 0
        self.refused = 0
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def open(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.max_connections is not None and len(self.protocols) >= self.max_connections:
            self.refused += 1
            return None
        proto = self.target.buildProtocol(addr)
        if proto is None:
            return None
        self.protocols.add(proto)
        self.accepted += 1
        proto.connectionLost = _Counted(self, proto)  # type: ignore[method-assign]
        return proto  # type: ignore[return-value]

    def idle(self) -> Deferred[None]:
        """Fires when no connection accepted here is open any more."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _fire_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def close_connections(self, abort: bool = False) -> int:
        """Close (or abort) every open connection; returns how many."""
        protos = list(self.protocols)
        for p in protos:
            transport = getattr(p, "transport", None)
            if transport is None:
                continue
            if abort and hasattr(transport, "abortConnection"):
                transport.abortConnection()
            else:
                transport.loseConnection()
        return len(protos)


class _Counted:
    """A protocol's ``connectionLost`` that first drops it from its :class:`Dispatch`.

    One small object per connection (a closure and a bound method cost
    about 300 bytes more, for every idle connection held).
    """

    __slots__ = ("dispatch", "proto", "own")

    def __init__(self, dispatch: Dispatch, proto: Any) -> None:
        self.dispatch = dispatch
        self.proto = proto
        self.own = proto.__dict__.get("connectionLost")  # an instance override, rarely

    def __call__(self, reason: Any = None) -> None:
        dispatch, proto = self.dispatch, self.proto
        dispatch.protocols.discard(proto)
        # put back what was there (normal attribute lookup when nothing was), then call it
        if self.own is None:
            del proto.connectionLost
        else:
            proto.connectionLost = self.own
        try:
            proto.connectionLost(reason)
        finally:
            if not dispatch.protocols:
                dispatch._fire_idle()


class UdpDispatch(DatagramProtocol):
    """The protocol of a UDP socket whose feature protocol can be replaced.

    The target is connected to the socket (``target.transport`` is the port,
    so it can reply from the listening address); a replaced target is stopped
    (``doStop``) after the new one is connected.
    """

    noisy = False

    def __init__(self, target: DatagramProtocol) -> None:
        self.target = target

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.target.makeConnection(self.transport)

    def stopProtocol(self) -> None:
        self.target.doStop()

    def swap(self, target: DatagramProtocol) -> None:
        if target is self.target:
            return
        old, self.target = self.target, target
        if self.transport is not None:
            target.makeConnection(self.transport)
            old.doStop()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.target.datagramReceived(data, addr)

    def connectionRefused(self) -> None:
        self.target.connectionRefused()


@dataclass
class Listener:
    """One bound socket and what it serves."""

    kind: str  # "tcp" | "udp"
    addr: Address
    name: str
    port: IListeningPort
    dispatch: Optional[Dispatch] = None
    udp: Optional[UdpDispatch] = None
    drain: bool = True

    @property
    def bound(self) -> Address:
        h = self.port.getHost()
        return Address(getattr(h, "host", self.addr.host), getattr(h, "port", self.addr.port))

    def snapshot(self) -> dict[str, Any]:
        d = self.dispatch
        return {
            "name": self.name, "kind": self.kind, "addr": str(self.addr), "bound": str(self.bound),
            "open": d.open if d else 0, "accepted": d.accepted if d else 0, "refused": d.refused if d else 0,
            "max_connections": d.max_connections if d else None,
        }


@dataclass(frozen=True)
class ListenerDiff:
    """What a reload does to the sockets: keys to keep, close and open."""

    keep: tuple[Key, ...]
    close: tuple[Key, ...]
    open: tuple[Key, ...]


def diff(current: Iterable[Key], wanted: Iterable[Key]) -> ListenerDiff:
    """Compare socket keys: unchanged ones keep their sockets."""
    cur = list(dict.fromkeys(current))
    want = list(dict.fromkeys(wanted))
    cur_set, want_set = set(cur), set(want)
    return ListenerDiff(
        keep=tuple(k for k in want if k in cur_set),
        close=tuple(k for k in cur if k not in want_set),
        open=tuple(k for k in want if k not in cur_set),
    )


class ListenerRegistry:
    """All listening sockets of the process, keyed by (kind, address)."""

    def __init__(self, reactor: Any, reuse_port: bool = False) -> None:
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.listeners: dict[Key, Listener] = {}
        self.retired: list[Listener] = []

    # -- binding ------------------------------------------------------------
    def open(self, spec: ListenSpec) -> Listener:
        """Bind what ``spec`` asks for, or raise :class:`StartupError`."""
        if spec.kind == "tcp":
            assert spec.factory is not None, f"{spec.name}: a tcp ListenSpec needs a factory"
            listener = self.bind_tcp(spec.addr, spec.factory, spec.name, spec.max_connections)
        elif spec.kind == "udp":
            assert spec.protocol is not None, f"{spec.name}: a udp ListenSpec needs a protocol"
            listener = self.bind_udp(spec.addr, spec.protocol, spec.name)
        else:
            raise StartupError(f"{spec.name}: unknown listener kind {spec.kind!r}")
        listener.drain = spec.drain
        return listener

    def bind_tcp(self, addr: Address, factory: IProtocolFactory, name: str,
                 max_connections: Optional[int] = None, backlog: int = 1024) -> Listener:
        """Listen on ``addr``, or raise :class:`StartupError` with one clear line."""
        dispatch = Dispatch(factory, max_connections)

        def listen() -> IListeningPort:
            if self.reuse_port:
                return self._adopt(addr, socket.SOCK_STREAM, backlog,
                                   lambda fd, fam: self.reactor.adoptStreamPort(fd, fam, dispatch))
            return self.reactor.listenTCP(addr.port, dispatch, backlog=backlog, interface=addr.host)

        return self._bind("tcp", addr, name, listen, dispatch=dispatch)

    def bind_udp(self, addr: Address, proto: DatagramProtocol, name: str) -> Listener:
        udp = UdpDispatch(proto)

        def listen() -> IListeningPort:
            if self.reuse_port:
                return self._adopt(addr, socket.SOCK_DGRAM, 0,
                                   lambda fd, fam: self.reactor.adoptDatagramPort(fd, fam, udp, maxPacketSize=65535))
            return self.reactor.listenUDP(addr.port, udp, interface=addr.host, maxPacketSize=65535)

        return self._bind("udp", addr, name, listen, udp=udp)

    def _bind(self, kind: str, addr: Address, name: str, listen: Callable[[], IListeningPort],
              **legs: Any) -> Listener:
        """``listen()`` unless ``addr`` is taken; register the listener (``legs``: its dispatcher)."""
        where = _where(kind, addr)
        key = (kind, addr)
        if addr.port and key in self.listeners:
            raise StartupError(f"{name}: {where} is already used by {self.listeners[key].name}")
        try:
            port = listen()
        except error.CannotListenError as e:
            raise StartupError(f"{name}: cannot listen on {where}: {_why(e)}") from None
        listener = Listener(kind, addr, name, port, **legs)
        self.listeners[_key(kind, addr, listener)] = listener
        _log.info("{name} listening on {where}", name=name, where=_where(kind, listener.bound))
        return listener

    def _adopt(self, addr: Address, kind: int, backlog: int, adopt: Any) -> IListeningPort:
        """A socket with SO_REUSEPORT, bound (and listening), handed to the reactor."""
        family = socket.AF_INET6 if addr.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((addr.host, addr.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)
            sock.setblocking(False)
            port: IListeningPort = adopt(sock.fileno(), family)  # the reactor dups the descriptor
            return port
        except OSError as e:
            raise error.CannotListenError(addr.host, addr.port, e) from None
        finally:
            sock.close()

    def update(self, spec: ListenSpec) -> None:
        """Point a kept socket at ``spec``'s new factory/protocol (a reload)."""
        listener = self.listeners[spec.key]
        listener.name = spec.name
        listener.drain = spec.drain
        if listener.dispatch is not None:
            assert spec.factory is not None
            listener.dispatch.target = spec.factory
            listener.dispatch.max_connections = spec.max_connections
        if listener.udp is not None:
            assert spec.protocol is not None
            listener.udp.swap(spec.protocol)

    def find(self, kind: str, addr: Address) -> Optional[Listener]:
        return self.listeners.get((kind, addr))

    # -- closing --------------------------------------------------------------
    def close(self, kind: str, addr: Address) -> Deferred[Any]:
        """Stop listening on ``(kind, addr)``; its open connections carry on."""
        listener = self.listeners.pop((kind, addr), None)
        if listener is None:
            return succeed(None)
        d = listener.dispatch
        if d is not None and d.open:
            self.retired.append(listener)
            d.idle().addCallback(lambda _: self.retired.remove(listener))
        _log.info("{name} stopped listening on {addr}", name=listener.name, addr=str(addr))
        return _maybe_deferred(listener.port.stopListening())

    def close_all(self) -> Deferred[Any]:
        return DeferredList([self.close(kind, addr) for (kind, addr) in list(self.listeners)])

    # -- connections ----------------------------------------------------------
    def all_listeners(self) -> Iterator[Listener]:
        """Bound listeners, then retired ones (closed, connections still open)."""
        yield from self.listeners.values()
        yield from list(self.retired)

    def open_connections(self) -> int:
        return sum(lst.dispatch.open for lst in self.all_listeners() if lst.dispatch is not None)

    def idle(self, drained_only: bool = True) -> Deferred[Any]:
        """Fires when the connections of every (draining) listener have ended."""
        ds = [lst.dispatch.idle() for lst in self.all_listeners()
              if lst.dispatch is not None and (lst.drain or not drained_only)]
        return DeferredList(ds)

    def close_connections(self, abort: bool = False, drained_only: Optional[bool] = None) -> int:
        """Close (or abort) open connections; ``drained_only`` selects by ListenSpec.drain."""
        n = 0
        for lst in self.all_listeners():
            if lst.dispatch is None or (drained_only is not None and lst.drain != drained_only):
                continue
            n += lst.dispatch.close_connections(abort)
        return n


def _where(kind: str, addr: Address) -> str:
    """An address as log lines and errors say it ("udp " before a UDP one)."""
    return str(addr) if kind == "tcp" else f"{kind} {addr}"


def _key(kind: str, addr: Address, listener: Listener) -> tuple[str, Address]:
    """Listeners are keyed by their configured address; port 0 ones (tests) by the port they got."""
    return (kind, addr if addr.port else Address(addr.host, listener.bound.port))


def _maybe_deferred(value: Any) -> Deferred[Any]:
    if isinstance(value, Deferred):
        return value
    return succeed(value)


def _why(e: error.CannotListenError) -> str:
    sock = getattr(e, "socketError", None)
    if sock is not None and getattr(sock, "strerror", None):
        return str(sock.strerror).lower()
    return str(e)
