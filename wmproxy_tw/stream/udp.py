"""``bind_mode = "udp"``: per-client sessions, each with its own upstream socket.

The listening socket receives every client's datagrams.  The first datagram
from a client address opens a :class:`UdpSession`: a member of the group is
chosen for it (load balancing keyed on the client IP) and a UDP socket of its
own is *connected* to that member, so replies are told apart by socket, not
by guessing.  Replies go back to the client from the listening socket (the
address the client sent to).  Datagrams keep their boundaries and size (up
to 64 KiB: ``maxPacketSize = 65535`` on every socket).

The session table is bounded (``max_udp_sessions``): when it is full the
least recently used session is closed.  A session idle for ``client_timeout``
closes; an ICMP "port unreachable" from the member (``connectionRefused``)
counts as a failure for passive health and closes the session, so the next
datagram picks a member again.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from ..balance.interfaces import IUpstreamSelector
from ..balance.selector import Member
from ..config.model import StreamServer

__all__ = ["MAX_DATAGRAM", "UdpRelay", "UdpSession"]

_log = Logger()

MAX_DATAGRAM = 65535
MAX_PENDING = 16  # datagrams held per session while its member's name resolves
SOCKET_BUFFER = 4 * 1024 * 1024  # asked for on the listening socket (the kernel may cap it)

Addr = tuple[str, int]


def _family_any(ip: str) -> str:
    return "::" if isIPv6Address(ip) else "0.0.0.0"


def grow_buffers(port: Any, size: int = SOCKET_BUFFER) -> None:
    """Best effort: bigger kernel buffers so bursts of large datagrams are not dropped."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError as e:
            _log.debug("cannot set UDP socket buffer: {e}", e=e)


class UdpSession(DatagramProtocol, TimeoutMixin):
    """One client's session: a connected upstream socket and its idle timer."""

    transport: Any

    def __init__(self, relay: UdpRelay, client: Addr, member: Member) -> None:
        self.relay = relay
        self.client = client
        self.member = member
        self.port: Any = None
        self.pending: list[bytes] | None = []  # until the upstream socket is open
        self.closed = False
        self.sent = 0
        self.received = 0

    def callLater(self, period: float, func: Any) -> IDelayedCall:  # TimeoutMixin's clock: ours
        return self.relay.reactor.callLater(period, func)

    # -- set-up ------------------------------------------------------------------
    def start(self) -> None:
        host, port = self.member.addr
        if isIPAddress(host) or isIPv6Address(host):
            self._open(host, port)
            return
        d = self.relay.reactor.resolve(host)

        def resolved(ip: str) -> None:
            if not self.closed:
                self._open(ip, port)

        def failed(f: Any) -> None:
            if not self.closed:
                _log.info("stream udp: cannot resolve {host}: {why}", host=host, why=f.getErrorMessage())
                self.relay.group.report_failure(self.member)
                self.relay.end(self)

        d.addCallbacks(resolved, failed)

    def _open(self, ip: str, port: int) -> None:
        reactor = self.relay.reactor
        try:
            self.port = reactor.listenUDP(0, self, interface=_family_any(ip), maxPacketSize=MAX_DATAGRAM)
            self.port.connect(ip, port)
        except OSError as e:
            _log.info("stream udp: cannot open a socket to {ip}:{port}: {e}", ip=ip, port=port, e=e)
            self.relay.end(self)
            return
        self.relay.group.report_success(self.member)
        self.setTimeout(self.relay.idle_timeout)
        pending, self.pending = self.pending or [], None
        for data in pending:
            self.from_client(data)

    # -- traffic ------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self.resetTimeout()
        if self.pending is not None:
            if len(self.pending) < MAX_PENDING:
                self.pending.append(data)
            else:
                self.relay.dropped += 1
            return
        if self.closed or self.transport is None:
            return
        try:
            self.transport.write(data)
            self.sent += 1
        except (OSError, MessageLengthError) as e:
            self.relay.dropped += 1
            _log.debug("stream udp: send to {m} failed: {e}", m=self.member.addr_str, e=e)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.resetTimeout()
        self.received += 1
        self.relay.reply(data, self.client)

    def connectionRefused(self) -> None:
        if self.closed:
            return
        _log.debug("stream udp: {m} refused a datagram (ICMP)", m=self.member.addr_str)
        self.relay.group.report_failure(self.member)
        self.relay.end(self)

    # -- ending ----------------------------------------------------------------------
    def timeoutConnection(self) -> None:
        _log.debug("stream udp: session of {c} idle: closed", c=self.client)
        self.relay.end(self)

    def close(self) -> None:
        """Stop the socket and timer; un-count the member (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.setTimeout(None)
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()
        self.relay.group.connection_finished(self.member)


class UdpRelay(DatagramProtocol):
    """The listening side of one UDP ``[[stream.server]]``: the session table."""

    transport: Any

    def __init__(self, reactor: Any, cfg: StreamServer, group: IUpstreamSelector) -> None:
        self.reactor = reactor
        self.cfg = cfg
        self.group = group
        self.idle_timeout = cfg.client_timeout
        self.max_sessions = cfg.max_udp_sessions
        self.sessions: OrderedDict[Addr, UdpSession] = OrderedDict()
        self.dropped = 0
        self.evicted = 0

    def startProtocol(self) -> None:
        grow_buffers(self.transport)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        client: Addr = (addr[0], addr[1])
        session = self.sessions.get(client)
        if session is None:
            session = self._open(client)
            if session is None:
                self.dropped += 1
                return
        else:
            self.sessions.move_to_end(client)
        session.from_client(data)

    def _open(self, client: Addr) -> UdpSession | None:
        host = client[0]
        if not self.cfg.admits(host):
            return None
        member = self.group.select(host)
        if member is None:
            return None
        while len(self.sessions) >= self.max_sessions:
            _addr, oldest = self.sessions.popitem(last=False)
            self.evicted += 1
            _log.debug("stream udp: session table full: closing the least recently used ({c})", c=oldest.client)
            oldest.close()
        self.group.connection_started(member)
        session = UdpSession(self, client, member)
        self.sessions[client] = session
        session.start()
        return None if session.closed else session

    def reply(self, data: bytes, client: Addr) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, client)
        except (OSError, MessageLengthError) as e:
            self.dropped += 1
            _log.debug("stream udp: reply to {c} failed: {e}", c=client, e=e)

    def end(self, session: UdpSession) -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        session.close()

    def stop(self) -> None:
        """Close every session (the listener is closed by the registry)."""
        for session in list(self.sessions.values()):
            self.end(session)
