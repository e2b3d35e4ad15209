"""Hostile bytes at the forward proxy: never an exception, always an answer or a close."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from wmproxy_tw.config import load_text
from wmproxy_tw.forward.server import ForwardFactory

CFG = load_text('[proxy]\nbind = "127.0.0.1:0"\nusername = "u"\npassword = "p"').config.proxy

PREFIXES = [b"", b"\x05", b"\x05\x01\x02", b"\x05\x02\x00\x02\x01\x01u\x01p", b"GET http://h/ HTTP/1.1\r\n",
            b"CONNECT h:1 HTTP/1.1\r\n", b"\x16\x03\x01"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600), cuts=st.lists(st.integers(1, 64), max_size=20))
def test_garbage_never_raises(prefix: bytes, body: bytes, cuts: list[int]) -> None:
    """Any bytes, split anyhow, leave the protocol answering or closing — never raising."""
    reactor = MemoryReactorClock()
    f = ForwardFactory(reactor, CFG)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                        hostAddress=IPv4Address("TCP", "127.0.0.1", 8090))
    p.makeConnection(t)
    data = prefix + body
    pos = 0
    for n in cuts + [len(data)]:
        if pos >= len(data) or t.disconnecting:
            break
        p.dataReceived(data[pos:pos + n])
        pos += n
    # no credentials were valid for any HTTP request: nothing may have been dialled for HTTP,
    # and a SOCKS5 client with the wrong method got no connection either
    assert reactor.tcpClients == [] or data.startswith(b"\x05\x02\x00\x02\x01\x01u\x01p")
    p.connectionLost(None)
