"""The Twisted tunnel adapter on in-memory transports: streams, flow control, fairness, heartbeats."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from wmproxy_tw.relay import A, B, Splice, SpliceProtocol
from wmproxy_tw.tunnel.connection import (
    CLOSE_GRACE,
    HIGH_WATER,
    StreamResetError,
    TunnelConnection,
    TunnelStream,
)
from wmproxy_tw.tunnel.frames import (
    Data,
    Error,
    ErrorCode,
    FrameDecoder,
    GoAway,
    Ping,
    Reset,
    ResetCode,
)
from wmproxy_tw.tunnel.session import (
    Event,
    HelloAccepted,
    HelloReceived,
    TunnelStateError,
)

pytestmark = pytest.mark.timeout(30)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Collects what a stream delivers; optionally pauses its stream on every delivery."""

    def __init__(self, pause_on_data: bool = False) -> None:
        self.data = bytearray()
        self.eof = False
        self.reason: Failure | None = None
        self.pause_on_data = pause_on_data

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.pause_on_data:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


class FakeProducer:
    """A push producer recording pause/resume/stop."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True


class Server(TunnelConnection):
    """Accepts every HELLO; attaches a Recorder to each stream (resets mapping "bad")."""

    def __init__(self, clock: Clock, **kw: Any) -> None:
        super().__init__(clock, False, **kw)
        self.opened: list[Recorder] = []
        self.lost: Failure | None = None

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived):
            self._send(self.mux.accept_hello(int(self.heartbeat_interval * 1000)))
            self.start_heartbeat()

    def stream_opened(self, stream: TunnelStream) -> None:
        if stream.mapping == "bad":
            stream.reset(ResetCode.UNKNOWN_MAPPING)
            return
        recorder = Recorder()
        stream.attach(recorder)
        self.opened.append(recorder)

    def tunnel_lost(self, reason: Failure) -> None:
        self.lost = reason


class Client(TunnelConnection):
    """Sends HELLO on connect; starts heartbeats when accepted."""

    def __init__(self, clock: Clock, **kw: Any) -> None:
        super().__init__(clock, True, **kw)

    def tunnel_made(self) -> None:
        self._send(self.mux.hello(client="test"))

    def session_event(self, event: Event) -> None:
        if isinstance(event, HelloAccepted):
            self.start_heartbeat()


class Pair:
    """A client and a server connection joined by two StringTransports and a pump."""

    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.server = Server(self.clock, **kw)
        self.client = Client(self.clock, **kw)
        self.st = StringTransport()
        self.ct = StringTransport()
        self.server.makeConnection(self.st)
        self.client.makeConnection(self.ct)
        self.pump()
        assert self.client.mux.is_open and self.server.mux.is_open

    def pump(self) -> None:
        """Move bytes both ways until both directions are quiet."""
        moved = True
        while moved:
            moved = False
            for src, dst in ((self.ct, self.server), (self.st, self.client)):
                data = src.value()
                if data:
                    src.clear()
                    dst.dataReceived(data)
                    moved = True

    def open(self, mapping: str = "m") -> tuple[TunnelStream, Recorder]:
        stream = self.client.open_stream(mapping)
        recorder = Recorder()
        stream.attach(recorder)
        return stream, recorder


def test_bytes_flow_both_ways_and_half_close_is_kept() -> None:
    """Bytes cross in both directions; CLOSE is a half-close; both CLOSEs end the stream cleanly."""
    pair = Pair()
    stream, mine = pair.open()
    stream.write(b"hello ")
    stream.write(b"world")
    pair.pump()
    theirs = pair.server.opened[0]
    assert bytes(theirs.data) == b"hello world"
    stream.loseWriteConnection()
    pair.pump()
    assert theirs.eof and theirs.reason is None
    theirs.transport.write(b"answer after EOF")
    pair.pump()
    assert bytes(mine.data) == b"answer after EOF"
    theirs.transport.loseConnection()
    pair.pump()
    assert mine.eof
    assert mine.reason is not None and mine.reason.check(error.ConnectionDone)
    assert theirs.reason is not None and theirs.reason.check(error.ConnectionDone)
    assert not pair.client.streams and not pair.server.streams
    assert pair.client.mux.stream_count == 0 and pair.server.mux.stream_count == 0


def test_stalled_reader_stops_only_its_own_stream() -> None:
    """A paused reader gets at most its window; its writer is paused; the other stream completes."""
    pair = Pair(window=4096, chunk=1024)
    slow, _ = pair.open()
    fast, _ = pair.open()
    pair.pump()
    slow_reader, fast_reader = pair.server.opened
    slow_reader.transport.pauseProducing()  # its downstream is full
    producers = [FakeProducer(), FakeProducer()]
    slow.registerProducer(producers[0], True)
    fast.registerProducer(producers[1], True)
    blob = bytes(range(256)) * 400  # 102 400 bytes
    slow.write(blob)
    fast.write(blob)
    for _ in range(200):
        pair.pump()
    assert bytes(fast_reader.data) == blob
    assert slow_reader.data == b""
    slow_server_stream = slow_reader.transport
    assert sum(len(x) for x in slow_server_stream._recv if x) <= 4096  # bounded by the window
    assert producers[0].paused and slow._pending <= len(blob)
    assert pair.client.mux.send_window(slow.id) == 0
    slow_reader.transport.resumeProducing()
    pair.pump()
    assert bytes(slow_reader.data) == blob
    assert not producers[0].paused and producers[0].resumes >= 1


def test_credit_returns_only_once_downstream_accepts() -> None:
    """Bytes delivered while the downstream pauses are consumed (credit returned) only on resume."""
    pair = Pair(window=4096, chunk=1024, max_window=4096)  # no auto-tuning: exact credit
    stream, _ = pair.open()
    pair.pump()
    reader = pair.server.opened[0]
    reader.pause_on_data = True
    stream.write(b"x" * 1024)
    pair.pump()
    assert len(reader.data) == 1024  # delivered, then the reader paused
    stream.write(b"x" * 3072)
    pair.pump()
    assert len(reader.data) == 1024  # held by the paused stream
    assert pair.client.mux.send_window(stream.id) == 0
    reader.pause_on_data = False
    reader.transport.resumeProducing()
    pair.pump()
    assert len(reader.data) == 4096
    assert pair.client.mux.send_window(stream.id) == 4096


def test_data_frames_are_scheduled_round_robin() -> None:
    """With the tunnel transport paused, queued streams then leave one chunk each in turn."""
    pair = Pair(chunk=1000)
    streams = [pair.open()[0] for _ in range(3)]
    pair.pump()
    pair.client.pauseProducing()
    for stream in streams:
        stream.write(b"y" * 3000)
    assert pair.ct.value() == b""
    pair.client.resumeProducing()
    ids = [f.stream_id for f in FrameDecoder().feed(pair.ct.value()) if isinstance(f, Data)]
    first = [s.id for s in streams]
    assert ids == first * 3


def test_producer_paused_above_high_water_and_resumed_after_credit() -> None:
    """Writing past the high-water mark pauses the stream's producer; credit resumes it."""
    pair = Pair(window=1024, chunk=1024)
    stream, _ = pair.open()
    producer = FakeProducer()
    stream.registerProducer(producer, True)
    stream.write(b"z" * (HIGH_WATER + 2048))
    assert producer.paused
    for _ in range(200):
        pair.pump()
    assert not producer.paused
    assert len(pair.server.opened[0].data) == HIGH_WATER + 2048


def test_heartbeat_pings_when_idle_and_kills_a_silent_peer() -> None:
    """PING after the interval of silence; after the timeout GOAWAY(HEARTBEAT_TIMEOUT) and abort."""
    pair = Pair(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    for _ in range(5):  # a live peer answers: nobody dies
        pair.clock.advance(1.0)
        pair.pump()
    assert not pair.ct.disconnecting and not pair.st.disconnecting
    pair.clock.advance(1.0)
    frames = FrameDecoder().feed(pair.ct.value())
    assert any(isinstance(f, Ping) for f in frames)
    pair.ct.clear()
    pair.clock.advance(2.0)  # 3 s of silence from the server
    frames = FrameDecoder().feed(pair.ct.value())
    assert any(isinstance(f, GoAway) and f.code == ErrorCode.HEARTBEAT_TIMEOUT for f in frames)
    assert pair.ct.disconnecting


def test_reset_both_ways_reaches_the_protocols() -> None:
    """abortConnection sends RESET(CANCEL); a RESET with a code ends the peer's protocol with it."""
    pair = Pair()
    stream, mine = pair.open()
    pair.pump()
    theirs = pair.server.opened[0]
    stream.abortConnection()
    pair.pump()
    assert mine.reason is not None and mine.reason.check(error.ConnectionAborted)
    assert theirs.reason is not None and theirs.reason.check(StreamResetError)
    assert theirs.reason.value.code == ResetCode.CANCEL
    _stream2, mine2 = pair.open()
    pair.pump()
    pair.server.opened[1].transport.reset(ResetCode.CONNECT_FAILED)
    pair.pump()
    assert mine2.reason is not None and mine2.reason.value.code == ResetCode.CONNECT_FAILED
    assert not pair.client.streams and not pair.server.streams


def test_stream_for_unknown_mapping_is_reset() -> None:
    """A stream the role cannot serve is answered RESET(UNKNOWN_MAPPING)."""
    pair = Pair()
    _stream, mine = pair.open("bad")
    pair.pump()
    assert mine.reason is not None and mine.reason.value.code == ResetCode.UNKNOWN_MAPPING


def test_garbage_gets_an_error_and_a_close() -> None:
    """Bytes that are no tunnel frame: one ERROR frame, close, abort after the grace period."""
    clock = Clock()
    server = Server(clock)
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frames = FrameDecoder().feed(transport.value())
    assert len(frames) == 1 and isinstance(frames[0], Error)
    assert transport.disconnecting
    server.dataReceived(b"more garbage")  # ignored once failed
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected


def test_no_hello_in_time_closes() -> None:
    """A connection that never says HELLO is aborted after the handshake timeout."""
    clock = Clock()
    server = Server(clock, heartbeat_timeout=4.0)
    transport = StringTransport()
    server.makeConnection(transport)
    clock.advance(4.0)
    assert transport.disconnecting


def test_losing_the_tunnel_ends_every_stream() -> None:
    """When the tunnel connection goes, every stream's protocol is told, with ConnectionLost."""
    pair = Pair()
    _s1, r1 = pair.open()
    _s2, r2 = pair.open()
    pair.client.connectionLost(Failure(error.ConnectionDone()))
    assert r1.reason is not None and r1.reason.check(error.ConnectionLost)
    assert r2.reason is not None and r2.reason.check(error.ConnectionLost)
    assert not pair.client.streams


def test_closed_stream_is_reset_if_the_peer_never_closes() -> None:
    """After loseConnection, a peer that never sends CLOSE gets RESET after the grace period."""
    pair = Pair()
    stream, mine = pair.open()
    pair.pump()
    stream.loseConnection()
    pair.pump()
    assert mine.reason is not None and mine.reason.check(error.ConnectionDone)
    assert pair.client.mux.has_stream(stream.id)
    pair.clock.advance(CLOSE_GRACE)
    frames = FrameDecoder().feed(pair.ct.value())
    assert any(isinstance(f, Reset) and f.stream_id == stream.id for f in frames)
    assert not pair.client.streams


def test_stream_is_a_splice_leg_with_producers_both_ways() -> None:
    """Splice registers a socket and a stream as each other's producers; bytes cross both ways."""
    pair = Pair()
    stream = pair.client.open_stream("m")
    local = StringTransport()
    splice = Splice(pair.clock)
    local_proto = SpliceProtocol(splice, A)
    local_proto.makeConnection(local)
    stream.attach(SpliceProtocol(splice, B))
    assert stream.producer is local and local.producer is stream
    local_proto.dataReceived(b"from the socket")
    pair.pump()
    reader = pair.server.opened[0]
    assert bytes(reader.data) == b"from the socket"
    reader.transport.write(b"to the socket")
    pair.pump()
    assert local.value() == b"to the socket"
    local_proto.connectionLost(Failure(error.ConnectionDone()))
    pair.pump()
    assert reader.eof or reader.reason is not None


def test_one_huge_write_and_small_writes_arrive_in_order() -> None:
    """A 1 MiB write leaves in chunk-sized frames, small writes coalesce; bytes arrive in order."""
    pair = Pair(window=8192, chunk=4096)
    stream, _ = pair.open()
    pair.pump()
    pair.client.pauseProducing()  # queue everything first
    blob = bytes(range(256)) * 4096
    stream.write(blob)
    for i in range(100):
        stream.write(b"%d," % i)
    pair.client.resumeProducing()
    sizes = []
    for _ in range(1000):
        sizes += [len(f.data) for f in FrameDecoder().feed(pair.ct.value()) if isinstance(f, Data)]
        pair.pump()
        if stream._pending == 0:
            break
    expected = blob + b"".join(b"%d," % i for i in range(100))
    assert bytes(pair.server.opened[0].data) == expected
    assert max(sizes) == 4096 and len(sizes) < len(expected) // 4096 + 3


def test_go_away_lets_open_streams_finish_then_closes() -> None:
    """GOAWAY: no new streams either way; the open one finishes; then the connection closes."""
    pair = Pair()
    stream, mine = pair.open()
    pair.pump()
    theirs = pair.server.opened[0]
    pair.server.go_away("maintenance")
    pair.pump()
    assert not pair.st.disconnecting and not pair.ct.disconnecting
    with pytest.raises(TunnelStateError):
        pair.client.open_stream("m")
    theirs.transport.write(b"last words")
    theirs.transport.loseConnection()
    pair.pump()
    assert bytes(mine.data) == b"last words"
    assert not pair.st.disconnecting  # the stream is half-open still
    stream.loseConnection()
    pair.pump()
    assert pair.st.disconnecting and pair.ct.disconnecting


def test_go_away_cuts_streams_after_the_grace_period() -> None:
    """A stream that never ends does not hold a draining connection open past CLOSE_GRACE."""
    pair = Pair()
    pair.open()
    pair.pump()
    pair.client.go_away()
    assert not pair.ct.disconnecting
    pair.clock.advance(CLOSE_GRACE)
    assert pair.ct.disconnecting


def test_busy_stream_window_grows_within_its_bound() -> None:
    """A stream moving many windows' worth gets a larger window, at most max_window."""
    pair = Pair(window=4096, chunk=1024, max_window=16384, window_budget=65536)
    stream, _ = pair.open()
    pair.pump()
    blob = bytes(range(256)) * 800  # 204 800 bytes
    stream.write(blob)
    for _ in range(100):
        pair.pump()
    assert bytes(pair.server.opened[0].data) == blob
    assert pair.server.mux._streams[stream.id].window == 16384
    assert pair.client.mux.send_window(stream.id) <= 16384


def test_credit_for_one_read_leaves_in_one_write() -> None:
    """The WINDOW_UPDATEs a read of several streams' DATA causes go out in one write."""
    pair = Pair(window=4096, chunk=1024, max_window=4096)
    streams = [pair.open()[0] for _ in range(3)]
    pair.pump()
    for stream in streams:
        stream.write(b"w" * 2048)
    writes: list[object] = []
    pair.st.writeSequence = writes.append  # type: ignore[method-assign]
    pair.server.dataReceived(pair.ct.value())
    assert len(writes) == 1
    updates = FrameDecoder().feed(b"".join(writes[0]))  # type: ignore[arg-type]
    assert sorted(f.stream_id for f in updates) == sorted(s.id for s in streams)
