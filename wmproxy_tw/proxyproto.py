"""The PROXY protocol (HAProxy, v1 text and v2 binary): send it and accept it.

Sending: :func:`build_header` makes the header written first on an upstream
connection (``send_proxy_protocol = "v1" | "v2"``).

Accepting (``accept_proxy_protocol``): :class:`HeaderReader` is a sans-IO
framer — fed any number of bytes at a time, bounded — that hands complete
headers to Twisted's own parsers (``twisted.protocols.haproxy``'s
``V1Parser.parse`` / ``V2Parser.parse``).  :class:`ProxyProtocolFactory` wraps a
listener's factory: a connection from a trusted front (``proxy_protocol_from``)
must start with a header, which then becomes the connection's ``getPeer()``;
a connection from anyone else that starts with one is closed (a client must
not choose the address we log and forward).

Twisted's ``HAProxyWrappingFactory`` is not used as-is: it decides on the
first read alone (a header split across reads is refused), trusts every
source, and is not half-close aware.  Its protocol's ``getPeer``/``getHost``
are reused by subclassing.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, ITCPTransport, ITransport
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .config.grammar import IPSet

__all__ = [
    "HeaderReader",
    "InvalidProxyHeader",
    "ProxyInfo",
    "ProxyProtocolFactory",
    "build_header",
    "sniff",
]

_log = Logger()

V1_PREFIX = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX  # 12 bytes
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's limit)
V2_MAX = 16 + 2048  # header + addresses + TLVs we are willing to read
HEADER_TIMEOUT = 10.0  # seconds a trusted front has to send its header


# -- sending ---------------------------------------------------------------------


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host:
        return None
    try:
        a = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def build_header(version: str, src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    """The PROXY header (``version`` "v1" or "v2") for a client ``src`` that reached us at ``dst``.

    Addresses that are not IPs give ``PROXY UNKNOWN`` (v1) or an unspecified
    family (v2): the receiver then uses the connection's own addresses.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")
    s = _ip(src[0]) if src else None
    d = _ip(dst[0]) if dst else None
    if s is not None and d is not None and s.version != d.version:
        # mixed families: say both in IPv6 (IPv4-mapped)
        s, d = (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (s, d))
    if s is None or d is None or src is None or dst is None:
        if version == "v1":
            return b"PROXY UNKNOWN\r\n"
        return V2_SIGNATURE + b"\x21\x00\x00\x00"
    if version == "v1":
        fam = "TCP4" if s.version == 4 else "TCP6"
        return f"PROXY {fam} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")
    if s.version == 4:
        body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
        return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


# -- accepting (sans-IO) -----------------------------------------------------------


def sniff(data: bytes | bytearray) -> str | None:
    """``"v1"``/``"v2"`` when ``data`` starts a PROXY header, ``""`` when it cannot, None when undecided."""
    n = len(data)
    if n == 0:
        return None
    if n < len(V1_PREFIX) and V1_PREFIX.startswith(bytes(data)):
        return None
    if data[: len(V1_PREFIX)] == V1_PREFIX:
        return "v1"
    if n < len(V2_SIGNATURE) and V2_SIGNATURE.startswith(bytes(data)):
        return None
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE:
        if n == len(V2_SIGNATURE):
            return None
        return "v2" if data[12] & 0xF0 == 0x20 else ""
    return ""


class HeaderReader:
    """Reads one PROXY header, fed any number of bytes at a time.

    :meth:`feed` returns None until the header is complete, then
    ``(ProxyInfo, rest)`` where ``rest`` are the bytes that followed it.
    Raises :class:`InvalidProxyHeader` as soon as the bytes cannot be a header
    (or one longer than the limits).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._kind: str | None = None

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        self._buf += data
        if self._kind is None:
            kind = sniff(self._buf)
            if kind is None:
                return None
            if kind == "":
                raise InvalidProxyHeader("not a PROXY protocol header")
            self._kind = kind
        if self._kind == "v1":
            end = self._buf.find(b"\r\n", 0, V1_MAX)
            if end < 0:
                if len(self._buf) >= V1_MAX:
                    raise InvalidProxyHeader("PROXY v1 line longer than 107 bytes")
                return None
            line, rest = bytes(self._buf[:end]), bytes(self._buf[end + 2 :])
            info = _checked(line, V1Parser.parse)
        else:
            if len(self._buf) < 16:
                return None
            size = 16 + struct.unpack("!H", self._buf[14:16])[0]
            if size > V2_MAX:
                raise InvalidProxyHeader(f"PROXY v2 header of {size} bytes is over the {V2_MAX}-byte limit")
            if len(self._buf) < size:
                return None
            line, rest = bytes(self._buf[:size]), bytes(self._buf[size:])
            info = _checked(line, V2Parser.parse)
        self._buf = bytearray()
        return info, rest


def _checked(header: bytes, parse: Any) -> ProxyInfo:
    """Twisted's parse, plus the checks it leaves out (IPs, port ranges, non-numeric ports)."""
    try:
        info = parse(header)
    except InvalidProxyHeader:
        raise
    except (ValueError, UnicodeDecodeError, struct.error, KeyError, IndexError) as e:
        raise InvalidProxyHeader(f"malformed PROXY header: {e}") from None
    ends = []
    for a in (info.source, info.destination):
        if isinstance(a, (IPv4Address, IPv6Address)):
            ip = _ip(a.host)
            if ip is None or not 0 <= a.port <= 65535:
                raise InvalidProxyHeader(f"bad address {a.host}:{a.port} in PROXY header")
            # canonical text ("2001:db8::1", not "2001:db8:0:0:0:0:0:1"; mapped IPv4 as IPv4)
            a = (IPv4Address if ip.version == 4 else IPv6Address)(a.type, str(ip), a.port)
        ends.append(a)
    info = ProxyInfo(info.header, ends[0], ends[1])
    return info


# -- accepting (Twisted glue) ---------------------------------------------------------


@implementer(IHalfCloseableProtocol, ITransport)
class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header of a trusted front, refuses one from anyone else.

    The wrapped protocol is connected once the header is read (trusted) or at
    once (untrusted); its ``getPeer()`` is then the client named by the header.
    It is the wrapped protocol's transport (it also provides every interface
    of its own transport, as any ``ProtocolWrapper``).
    """

    factory: ProxyProtocolFactory
    transport: ITCPTransport  # the accepted TCP connection, set by makeConnection

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        self.transport = transport
        self.connected = 1
        self.factory.registerProtocol(self)
        self._started = False
        self._reader: HeaderReader | None = None
        self._sniffed: bytearray | None = None
        self._deadline: IDelayedCall | None = None
        peer = transport.getPeer()
        if getattr(peer, "host", None) in self.factory.trusted:
            self._reader = HeaderReader()
            self._deadline = self.factory.clock.callLater(self.factory.timeout, self._too_slow)
        else:
            self._sniffed = bytearray()
            self._start()

    def _start(self) -> None:
        self._started = True
        self.wrappedProtocol.makeConnection(self)

    def _peer_host(self) -> str:
        """The address the connection comes from (not the one a header names)."""
        return str(getattr(self.transport.getPeer(), "host", "?"))

    def _too_slow(self) -> None:
        self._deadline = None
        _log.info("PROXY header from {peer} not received in {t}s: closed",
                  peer=self._peer_host(), t=self.factory.timeout)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._reader is not None:
            try:
                got = self._reader.feed(data)
            except InvalidProxyHeader as e:
                _log.info("bad PROXY header from {peer}: {why}: closed",
                          peer=self._peer_host(), why=str(e) or "malformed")
                self._reader = None
                self.transport.abortConnection()
                return
            if got is None:
                return
            info, rest = got
            self._reader = None
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            if isinstance(info.source, (IPv4Address, IPv6Address)):
                self._proxyInfo = info
            self._start()
            if rest and self.connected:
                self.wrappedProtocol.dataReceived(rest)
            return
        if self._sniffed is not None:
            self._sniffed += data
            kind = sniff(self._sniffed)
            if kind is None:
                return  # still a prefix of a header signature (at most 12 bytes held)
            if kind:
                _log.info("PROXY header from untrusted {peer}: closed", peer=self._peer_host())
                self._sniffed = None
                self.transport.abortConnection()
                return
            data, self._sniffed = bytes(self._sniffed), None
        if self._started:
            self.wrappedProtocol.dataReceived(data)

    def readConnectionLost(self) -> None:
        wrapped = self.wrappedProtocol
        if self._started and self._sniffed:
            # a client that half-closed after a prefix of "PROXY ": deliver what it sent
            data, self._sniffed = bytes(self._sniffed), None
            wrapped.dataReceived(data)
        if self._started and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = self.wrappedProtocol
        if self._started and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.connected = 0
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)


class ProxyProtocolFactory(WrappingFactory[ProxyHeaderProtocol]):
    """Wraps a listener's factory with PROXY protocol acceptance from ``trusted`` sources."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrapped: Any, trusted: IPSet, clock: Any, timeout: float = HEADER_TIMEOUT) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)
