"""SOCKS5 UDP ASSOCIATE: one UDP socket per association (RFC 1928 §7).

The client sends ``[RSV FRAG ATYP DST.ADDR DST.PORT DATA]`` to our socket; we
send DATA to the destination and wrap replies the same way.  Only datagrams
from the client's IP are relayed; fragments (FRAG != 0) are dropped; names
resolve without blocking; the association ends with its TCP control
connection or after ``idle_timeout`` without traffic.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from ..connect import TargetPolicy
from .socks5 import Socks5Error, build_udp_datagram, parse_udp_datagram

__all__ = ["UdpAssociation"]

_log = Logger()

MAX_PENDING_RESOLVES = 64


def _norm(host: str) -> str:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class UdpAssociation(DatagramProtocol):
    """Relays datagrams between one SOCKS5 client and any destination."""

    transport: Any

    def __init__(self, reactor: Any, client_ip: str, policy: TargetPolicy, idle_timeout: float) -> None:
        self.reactor = reactor
        self.client_ip = _norm(client_ip)
        self.client_addr: Optional[tuple[str, int]] = None
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.port: Any = None
        self.resolving = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.dropped = 0
        self._last = reactor.seconds()
        self._idle: Optional[IDelayedCall] = None

    @classmethod
    def open(cls, reactor: Any, interface: str, client_ip: str, policy: TargetPolicy,
             idle_timeout: float = 600.0) -> "UdpAssociation":
        assoc = cls(reactor, client_ip, policy, idle_timeout)
        assoc.port = reactor.listenUDP(0, assoc, interface=interface, maxPacketSize=65535)
        assoc._idle = reactor.callLater(idle_timeout, assoc._check_idle)
        return assoc

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self._last = self.reactor.seconds()
        host, port = _norm(addr[0]), addr[1]
        if self.client_addr is None and host == self.client_ip:
            self.client_addr = (addr[0], port)
        if self.client_addr is not None and (host, port) == (_norm(self.client_addr[0]), self.client_addr[1]):
            self._from_client(data)
        else:
            self._from_remote(data, host, port)

    def _from_client(self, data: bytes) -> None:
        try:
            dg = parse_udp_datagram(data)
        except Socks5Error as e:
            self.dropped += 1
            _log.debug("socks5 udp: malformed datagram dropped: {e}", e=e.message)
            return
        if dg.frag != 0 or dg.port == 0:
            self.dropped += 1
            return
        if not self.policy.allows(dg.host, dg.port):
            self.dropped += 1
            return
        try:
            ipaddress.ip_address(dg.host)
        except ValueError:
            if self.resolving >= MAX_PENDING_RESOLVES:
                self.dropped += 1
                return
            self.resolving += 1
            d = self.reactor.resolve(dg.host)

            def resolved(ip: str, port: int = dg.port, payload: bytes = dg.payload) -> None:
                self.resolving -= 1
                self._send_remote(payload, ip, port)

            def failed(_f: Any) -> None:
                self.resolving -= 1
                self.dropped += 1

            d.addCallbacks(resolved, failed)
            return
        self._send_remote(dg.payload, dg.host, dg.port)

    def _send_remote(self, payload: bytes, host: str, port: int) -> None:
        if self.port is None or self.transport is None:
            return
        if not self.policy.allows(host, port):
            self.dropped += 1
            return
        try:
            self.transport.write(payload, (host, port))
            self.datagrams_out += 1
        except OSError as e:
            self.dropped += 1
            _log.debug("socks5 udp: cannot send to {h}:{p}: {e}", h=host, p=port, e=e)

    def _from_remote(self, data: bytes, host: str, port: int) -> None:
        if self.client_addr is None:
            self.dropped += 1
            return
        self.datagrams_in += 1
        try:
            self.transport.write(build_udp_datagram(host, port, data), self.client_addr)
        except OSError as e:
            self.dropped += 1
            _log.debug("socks5 udp: cannot send to client: {e}", e=e)

    def _check_idle(self) -> None:
        self._idle = None
        left = self._last + self.idle_timeout - self.reactor.seconds()
        if left > 0:
            self._idle = self.reactor.callLater(left, self._check_idle)
        else:
            self.close()

    def close(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()
