"""The WebSocket ⇄ TCP bridge on string transports: ordering, back-pressure, close codes, limits."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from wmproxy_tw.config import load_text
from wmproxy_tw.websocket.bridge import (
    CLOSED,
    CONNECTING,
    OPEN,
    Bridge,
    BridgeTcpProtocol,
    BridgeWsMixin,
    ReactorTimer,
    apply_limits,
)


class _FakeWsBase:
    """Just enough of autobahn's protocol for the bridge and the mixin."""

    def __init__(self) -> None:
        self.state = OPEN
        self.transport = StringTransport()
        self.data = b""
        self.failedByMe = False
        self.autoPingTimeout = 5.0
        self.autoPingTimeoutCall: Any = None
        self.autoPingPending: Any = None
        self.sent: list[tuple[bytes, bool]] = []
        self.closes: list[tuple[int, bytes]] = []
        self.dropped: list[bool] = []
        self.ping_timeouts = 0

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.sent.append((payload, isBinary))

    def sendClose(self, code: int, reason: str) -> None:
        self.closes.append((code, reason.encode()))
        self.state = WS_CLOSING

    def sendCloseFrame(self, code: int, reasonUtf8: bytes, isReply: bool = False) -> None:
        self.closes.append((code, reasonUtf8))
        self.state = WS_CLOSING

    def dropConnection(self, abort: bool = False) -> None:
        self.dropped.append(abort)
        self.state = CLOSED

    def onAutoPingTimeout(self) -> None:
        self.ping_timeouts += 1

    def _dataReceived(self, data: bytes) -> None:
        self.data += data


WS_CLOSING = 2


class FakeWs(BridgeWsMixin, _FakeWsBase):
    pass


def _bridge(max_message: int = 1 << 24) -> tuple[Bridge, Clock, list[Bridge]]:
    clock = Clock()
    done: list[Bridge] = []
    return Bridge(clock, idle_timeout=60, max_message=max_message, on_done=done.append), clock, done


def _tcp(bridge: Bridge) -> tuple[BridgeTcpProtocol, StringTransport]:
    proto = BridgeTcpProtocol(bridge)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_tcp_waits_paused_for_the_websocket_then_flows() -> None:
    """TCP is paused until the WebSocket opens; bytes read early go out first, as binary messages."""
    bridge, _c, _d = _bridge()
    tcp_proto, tcp = _tcp(bridge)
    assert tcp.producerState == "paused"
    tcp_proto.dataReceived(b"early")
    ws = FakeWs()
    bridge.ws_open(ws)
    assert tcp.producerState == "producing"
    assert ws.sent == [(b"early", True)]
    tcp_proto.dataReceived(b"more")
    assert ws.sent[-1] == (b"more", True)
    ws.onMessageFrameData(b"from ws")
    assert tcp.value() == b"from ws"


def test_backpressure_registers_producers_both_ways() -> None:
    """Each side is the other's streaming producer: a full WebSocket buffer pauses TCP reads and back."""
    bridge, _c, _d = _bridge()
    _tcp_proto, tcp = _tcp(bridge)
    ws = FakeWs()
    bridge.ws_open(ws)
    # the WebSocket's transport went over its high-water mark: it pauses its producer, the TCP side
    assert ws.transport.producer is tcp and ws.transport.streaming
    ws.transport.producer.pauseProducing()
    assert tcp.producerState == "paused"
    ws.transport.producer.resumeProducing()
    assert tcp.producerState == "producing"
    # the TCP transport is full: its producer (the WebSocket leg) stops reading the WebSocket socket
    tcp.producer.pauseProducing()
    assert ws.transport.producerState == "paused" and ws._reading_paused
    tcp.producer.resumeProducing()
    assert ws.transport.producerState == "producing"


def test_ping_timeout_waits_while_reading_is_paused() -> None:
    """A ping timeout while we are not reading is judged only after reading resumes."""
    ws = FakeWs()
    ws.factory = type("F", (), {"_batched_timer": ReactorTimer(clock := Clock())})()
    ws.autoPingPending = b"ping"
    ws.pause_reading()
    ws.onAutoPingTimeout()
    assert ws.ping_timeouts == 0
    ws.resume_reading()
    clock.advance(4.9)
    assert ws.ping_timeouts == 0
    clock.advance(0.2)
    assert ws.ping_timeouts == 1
    ws.onAutoPingTimeout()  # reading: the peer is at fault at once
    assert ws.ping_timeouts == 2


def test_close_codes() -> None:
    """TCP EOF → 1000; TCP reset → 1011; the WebSocket going away closes TCP after its flush."""
    bridge, _c, done = _bridge()
    tcp_proto, tcp = _tcp(bridge)
    ws = FakeWs()
    bridge.ws_open(ws)
    tcp_proto.readConnectionLost()
    assert ws.closes == [(1000, b"tcp side closed")]
    ws.onMessageFrameData(b"late reply")  # the peer's data before its close reply still arrives
    assert tcp.value() == b"late reply"
    ws.onClose(True, 1000, None)
    assert tcp.disconnecting
    tcp_proto.connectionLost(Failure(error.ConnectionDone()))
    assert done == [bridge]

    bridge2, _c2, _d2 = _bridge()
    tcp_proto2, _tcp2 = _tcp(bridge2)
    ws2 = FakeWs()
    bridge2.ws_open(ws2)
    tcp_proto2.connectionLost(Failure(error.ConnectionLost()))
    assert ws2.closes == [(1011, b"tcp connection lost")]


def test_tcp_gone_during_opening_handshake_drops_the_websocket() -> None:
    """If TCP goes away before the WebSocket opens, the half-open WebSocket is dropped."""
    bridge, _c, done = _bridge()
    tcp_proto, _tcp_t = _tcp(bridge)
    ws = FakeWs()
    ws.state = CONNECTING
    bridge.ws_made(ws)
    tcp_proto.connectionLost(Failure(error.ConnectionDone()))
    assert ws.dropped == [True] and done == [bridge]
    late = FakeWs()
    bridge.ws_open(late)  # opened after all: closed at once
    assert late.closes == [(1000, b"tcp side closed")]


def test_messages_are_split_to_the_size_limit() -> None:
    """A TCP read bigger than max_message_size goes as several messages, none over the limit."""
    bridge, _c, _d = _bridge(max_message=1000)
    tcp_proto, _tcp_t = _tcp(bridge)
    ws = FakeWs()
    bridge.ws_open(ws)
    tcp_proto.dataReceived(b"x" * 2500)
    assert [len(p) for p, _b in ws.sent] == [1000, 1000, 500]


def test_failed_frames_and_handshake_size_are_not_passed_on() -> None:
    """After failing a connection (e.g. 1009) no frame data reaches TCP; a huge handshake is dropped."""
    bridge, _c, _d = _bridge()
    _tcp_proto, tcp = _tcp(bridge)
    ws = FakeWs()
    bridge.ws_open(ws)
    ws.failedByMe = True
    ws.onMessageFrameData(b"after the limit")
    assert tcp.value() == b""
    greedy = FakeWs()
    greedy.state = CONNECTING
    greedy.dataReceived(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000)
    assert greedy.dropped == [True]


def test_frames_right_after_the_handshake_are_not_an_oversized_head() -> None:
    """A 101 followed in the same read by 40 KiB of frames is processed, not refused as too big."""
    ws = FakeWs()
    ws.state = CONNECTING
    ws.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + b"\x82" * 40000)
    assert ws.dropped == [] and len(ws.data) > 40000
    held = FakeWs()
    held.state = CONNECTING
    held._hold_input = True  # a server still deciding: early bytes are held, but only so many
    held.dataReceived(b"\x82" * 1000)
    assert held.data == b"\x82" * 1000 and held.dropped == []
    held.dataReceived(b"\x82" * 20000)
    assert held.dropped == [True]


def test_apply_limits_on_both_factories() -> None:
    """Every autobahn factory gets our size limits, pings, handshake timeouts and close-frame failing."""
    cfg = load_text('[[stream.server]]\nbind_addr = "127.0.0.1:1"\nproxy_url = "ws://h/"\nbind_mode = "tcp2ws"\n'
                    'max_message_size = "2m"\nping_interval = "7s"\nping_timeout = "3s"\n'
                    'open_handshake_timeout = "4s"\n').config.stream.server[0]  # type: ignore[union-attr]
    clock = Clock()
    for factory in (WebSocketServerFactory(reactor=clock), WebSocketClientFactory(reactor=clock)):
        apply_limits(factory, cfg, clock)
        assert factory.maxFramePayloadSize == factory.maxMessagePayloadSize == 2 * 1024 * 1024
        assert (factory.autoPingInterval, factory.autoPingTimeout, factory.openHandshakeTimeout) == (7, 3, 4)
        assert factory.failByDrop is False
        assert isinstance(factory._batched_timer, ReactorTimer)
    server = WebSocketServerFactory(reactor=clock)
    apply_limits(server, cfg, clock)
    assert server.webStatus is False and server.perMessageCompressionAccept([object()]) is None


class _LenientTransport(StringTransport):
    """autobahn unregisters a producer it never registered when it drops a connection."""

    def unregisterProducer(self) -> None:
        self.producer = None


def test_ws2tcp_answers_an_oversized_early_flood_once() -> None:
    """Frames flooding in while the upstream is dialled get one 431; the dial finishing later
    writes no second response (it was a '499 client closed' on the wire) and closes the upstream."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock

    from wmproxy_tw.balance.testing import FakeSelector
    from wmproxy_tw.websocket.ws2tcp import Ws2TcpFactory

    cfg = load_text('[[stream.server]]\nbind_addr = "127.0.0.1:1"\nproxy_url = "tcp://127.0.0.1:2"\n'
                    'bind_mode = "ws2tcp"\n').config.stream.server[0]  # type: ignore[union-attr]
    reactor = MemoryReactorClock()
    peer = IPv4Address("TCP", "127.0.0.1", 5555)
    proto = Ws2TcpFactory(reactor, cfg, FakeSelector([("127.0.0.1", 2)])).buildProtocol(peer)
    client = _LenientTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 1))
    proto.makeConnection(client)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    proto.dataReceived(b"\x82" * 20000)
    _host, _port, dial_factory, *_ = reactor.tcpClients[0]
    upstream = _LenientTransport()
    dial_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)).makeConnection(upstream)
    assert client.value() == b"HTTP/1.1 431 request head over 16384 bytes\r\n\r\n"
    assert upstream.disconnecting
