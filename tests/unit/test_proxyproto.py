"""PROXY protocol v1/v2: headers we send, the sans-IO reader, the trusting wrapper (no sockets)."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import implementer

from wmproxy_tw.config.grammar import parse_ipset
from wmproxy_tw.proxyproto import (
    V2_SIGNATURE,
    HeaderReader,
    InvalidProxyHeader,
    ProxyProtocolFactory,
    build_header,
    sniff,
)

V2_EXAMPLE = (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12) + bytes([192, 0, 2, 1, 10, 0, 0, 1])
              + struct.pack("!HH", 40000, 443))


@pytest.mark.parametrize("src,dst", [
    (("192.0.2.1", 40000), ("10.0.0.1", 443)),
    (("2001:db8::1", 40000), ("2001:db8::2", 443)),
])
def test_v1_header_parses_back_with_twisted(src: tuple[str, int], dst: tuple[str, int]) -> None:
    """A v1 header we build reads back to the same addresses with Twisted's V1Parser."""
    header = build_header("v1", src, dst)
    assert header.endswith(b"\r\n") and len(header) <= 107
    info = V1Parser.parse(header[:-2])
    assert (info.source.host, info.source.port) == src
    assert (info.destination.host, info.destination.port) == dst


@pytest.mark.parametrize("src,dst", [
    (("192.0.2.1", 40000), ("10.0.0.1", 443)),
    (("2001:db8::1", 1), ("2001:db8::2", 65535)),
])
def test_v2_header_parses_back_with_twisted(src: tuple[str, int], dst: tuple[str, int]) -> None:
    """A v2 header we build reads back to the same addresses with Twisted's V2Parser."""
    info = V2Parser.parse(build_header("v2", src, dst))
    assert (ip_address(info.source.host), info.source.port) == (ip_address(src[0]), src[1])
    assert (ip_address(info.destination.host), info.destination.port) == (ip_address(dst[0]), dst[1])


def test_reader_gives_canonical_addresses() -> None:
    """The reader normalises addresses: compressed IPv6, IPv4-mapped IPv6 as IPv4."""
    got = HeaderReader().feed(build_header("v2", ("2001:db8::1", 1), ("2001:db8::2", 2)))
    assert got is not None and got[0].source.host == "2001:db8::1"
    got = HeaderReader().feed(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 7 8\r\n")
    assert got is not None and isinstance(got[0].source, IPv4Address) and got[0].source.host == "192.0.2.9"


def test_mixed_families_and_unknown_addresses() -> None:
    """IPv4 with IPv6 is sent as IPv6 (mapped); non-IP addresses give UNKNOWN / unspecified."""
    info = V1Parser.parse(build_header("v1", ("192.0.2.1", 5), ("::1", 6))[:-2])
    assert ip_address(info.source.host) == ip_address("::ffff:192.0.2.1") and info.destination.host == "::1"
    mapped = V1Parser.parse(build_header("v1", ("::ffff:192.0.2.1", 5), ("192.0.2.2", 6))[:-2])
    assert mapped.source.host == "192.0.2.1"
    assert build_header("v1", None, ("10.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"
    info2 = V2Parser.parse(build_header("v2", ("/tmp/sock", 0), ("10.0.0.1", 1)))
    assert info2.source is None
    with pytest.raises(ValueError):
        build_header("v3", None, None)


@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.1 10.0.0.1 40000 443\r\n", V2_EXAMPLE])
def test_reader_one_byte_at_a_time(header: bytes) -> None:
    """The reader takes a header split into single bytes and returns the bytes after it."""
    reader = HeaderReader()
    stream = header + b"payload"
    for i in range(len(header) - 1):
        assert reader.feed(stream[i : i + 1]) is None
    got = reader.feed(stream[len(header) - 1 :])
    assert got is not None
    info, rest = got
    assert rest == b"payload"
    assert (info.source.host, info.source.port) == ("192.0.2.1", 40000)


@pytest.mark.parametrize("data,why", [
    (b"GET / HTTP/1.1\r\n", "not a PROXY"),
    (b"PROXY TCP4 " + b"1" * 120, "107"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 http 443\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 99999 443\r\n", "bad address"),
    (b"PROXY TCP4 example.com 10.0.0.1 1 443\r\n", "bad address"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 1\r\n", ""),
    (V2_SIGNATURE + b"\x31", "not a PROXY"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000), "limit"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4) + b"\x00" * 4, ""),
])
def test_reader_rejects_bad_headers(data: bytes, why: str) -> None:
    """Garbage, over-long lines, bad ports/IPs and truncated v2 bodies raise InvalidProxyHeader."""
    with pytest.raises(InvalidProxyHeader) as e:
        assert HeaderReader().feed(data) is None  # raising at once, or ...
        raise InvalidProxyHeader("incomplete")  # ... we fail here: each case is decisive
    assert why in str(e.value)


def test_sniff_decides_early() -> None:
    """sniff: undecided on signature prefixes, "" as soon as a byte differs."""
    assert sniff(b"") is None and sniff(b"PRO") is None and sniff(V2_SIGNATURE[:5]) is None
    assert sniff(b"PROXY ") == "v1" and sniff(V2_SIGNATURE + b"\x21") == "v2"
    assert sniff(b"PRX") == "" and sniff(b"GET") == "" and sniff(b"\x16\x03\x01") == ""


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False
        self.read_closed = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def _wrap(peer: str, trusted: str = "127.0.0.1") -> tuple[object, Recorder, StringTransport, Clock]:
    inner = Recorder()
    factory = Factory.forProtocol(lambda: inner)
    clock = Clock()
    wrapping = ProxyProtocolFactory(factory, parse_ipset(trusted), clock, timeout=5)
    proto = wrapping.buildProtocol(IPv4Address("TCP", peer, 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
    proto.makeConnection(transport)
    return proto, inner, transport, clock


def test_trusted_front_header_becomes_the_peer() -> None:
    """From a trusted front the inner protocol starts after the header and sees its source as peer."""
    proto, inner, _t, _c = _wrap("127.0.0.1")
    assert not inner.made
    for b in V2_EXAMPLE:
        proto.dataReceived(bytes([b]))
    assert inner.made and (inner.peer.host, inner.peer.port) == ("192.0.2.1", 40000)
    proto.dataReceived(b"hello")
    assert inner.data == b"hello"
    proto.readConnectionLost()
    assert inner.read_closed


def test_trusted_front_without_header_is_closed_and_timed_out() -> None:
    """A trusted front that sends no header in time, or garbage, is aborted; the inner never starts."""
    _proto, inner, transport, clock = _wrap("127.0.0.1")
    clock.advance(5)
    assert transport.disconnecting and not inner.made
    proto2, inner2, transport2, _c = _wrap("127.0.0.1")
    proto2.dataReceived(b"GET / HTTP/1.1\r\n")
    assert transport2.disconnecting and not inner2.made
    proto2.connectionLost(None)
    assert not inner2.lost


def test_untrusted_source_sending_a_header_is_closed() -> None:
    """An untrusted client that starts with a PROXY header is aborted; its bytes never reach the inner."""
    proto, inner, transport, _c = _wrap("198.51.100.7")
    assert inner.made  # untrusted: served at once, as itself
    proto.dataReceived(b"PRO")
    assert inner.data == b"" and not transport.disconnecting
    proto.dataReceived(b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert transport.disconnecting and inner.data == b""


def test_untrusted_plain_client_passes_through() -> None:
    """An untrusted client with ordinary bytes (even a 'PRO' prefix that turns out different) passes."""
    proto, inner, transport, _c = _wrap("198.51.100.7")
    proto.dataReceived(b"PRO")
    proto.dataReceived(b"TOCOL v2\n")
    proto.dataReceived(b"more")
    assert inner.data == b"PROTOCOL v2\nmore" and not transport.disconnecting
    assert inner.peer.host == "198.51.100.7"
