"""Twisted adapter over the sans-IO :class:`~wmproxy_tw.tunnel.session.Multiplexer`.

:class:`TunnelConnection` is the protocol of one tunnel connection (TCP or TLS).  It feeds the
bytes it reads to :class:`~wmproxy_tw.tunnel.frames.FrameDecoder` and the multiplexer, and it
exposes every stream as a :class:`TunnelStream`: a transport-like object (``write``,
``loseConnection``, ``loseWriteConnection``, ``abortConnection``, producers both ways) that can be
one leg of :class:`wmproxy_tw.relay.Splice` or the transport of any protocol.

Back-pressure, per stream:

* *sending*: bytes written to a stream wait in its own buffer until the peer grants credit and the
  tunnel transport is writable.  Above :data:`HIGH_WATER` buffered bytes the producer registered
  on the stream (the local socket) is paused, and resumed once the buffer drains below
  :data:`LOW_WATER` (after the peer's ``WINDOW_UPDATE``).  ``DATA`` frames of all streams leave
  in round-robin order, one chunk per stream per turn, only while the tunnel transport has not
  paused us, so one busy stream cannot starve the others.
* *receiving*: a stream delivers ``DATA`` to its protocol unless its consumer paused it; received
  bytes are reported to the multiplexer as consumed (which returns credit to the peer) only once
  they were written downstream without the downstream pausing.  A stalled reader thus stops only
  its own stream: the peer runs out of credit for it and nothing else.  The tunnel transport is
  never paused for reading, and what a paused stream holds is bounded by the window it granted.

Heartbeats (docs/tunnel-protocol.md §5) run on the injected clock.  Subclasses
(:mod:`.server`, :mod:`.client`) supply the role: authentication, registrations, what to do with
a stream the peer opens.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..relay import A, B, Splice, SpliceProtocol
from .frames import (
    DEFAULT_WINDOW,
    MAX_DATA_PAYLOAD,
    ErrorCode,
    Frame,
    FrameDecoder,
    ResetCode,
    TunnelProtocolError,
    encode_all,
)
from .session import (
    AuthRejected,
    ErrorReceived,
    Event,
    GoAwayReceived,
    Heartbeat,
    HelloAccepted,
    HelloReceived,
    Multiplexer,
    PingReceived,
    PongReceived,
    RegisterReceived,
    RegistrationAccepted,
    RegistrationRefused,
    Reply,
    StreamClosed,
    StreamData,
    StreamOpened,
    StreamReset,
    TunnelStateError,
    WindowOpened,
)

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "MAX_STREAM_WINDOW",
    "WINDOW_BUDGET",
    "StreamResetError",
    "StreamSpliceFactory",
    "TunnelConnection",
    "TunnelStream",
    "peer_address",
]

_log = Logger()

HIGH_WATER = 64 * 1024
"""Bytes a stream buffers for sending before it pauses its producer."""
LOW_WATER = 16 * 1024
"""The stream resumes its producer once its send buffer is back below this."""
CLOSE_GRACE = 5.0
"""After a graceful close of the tunnel (or a stream) is asked, abort it if still open then."""
HANDSHAKE_TIMEOUT = 10.0
"""The HELLO / HELLO_OK exchange must be over within this (or ``heartbeat_timeout`` if smaller)."""

LINK_BUFFER = 256 * 1024
"""Read size, send size and write high-water mark of the tunnel's own socket (Twisted: 64 KiB
reads, 128 KiB sends)."""
MAX_STREAM_WINDOW = 4 * 1024 * 1024
"""A stream's receive window grows (auto-tuning) from the initial window up to this."""
WINDOW_BUDGET = 16 * 1024 * 1024
"""Window growth allowed over all streams of one connection: the receive buffers of a connection
are bounded by ``max_streams * window + WINDOW_BUDGET``."""
TURN = 256 * 1024
"""Most bytes a stream sends in one turn when no other stream is waiting (else one chunk)."""

_EOF = None  # marker in a stream's receive queue


class StreamResetError(error.ConnectionLost):
    """The peer reset the stream; ``code`` is its :class:`ResetCode` value."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset by the peer ({_reset_name(code)})")
        self.code = code


def _reset_name(code: int) -> str:
    try:
        return ResetCode(code).name
    except ValueError:
        return f"code {code}"


def peer_address(text: str | None, fallback: Any = None) -> Any:
    """``ip:port`` / ``[v6]:port`` as a Twisted address (``fallback`` when not an IP address)."""
    if not text:
        return fallback
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        number = int(port)
    except ValueError:
        return fallback
    if ip.version == 6:
        return IPv6Address("TCP", host, number)
    return IPv4Address("TCP", host, number)


def address_text(addr: Any) -> str | None:
    """A Twisted address as ``ip:port`` for an ``OPEN`` frame (``None`` if it has no IP)."""
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if not host or port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(ITransport, IPushProducer, IConsumer)
class TunnelStream:
    """One stream of a tunnel connection, seen as a transport.

    Give it a protocol with :meth:`attach`.  ``mapping`` is the mapping (or ``@service``) named in
    the stream's ``OPEN``; ``peer`` is the public client's address when the opener sent one.
    """

    def __init__(self, conn: TunnelConnection, stream_id: int, mapping: str, peer: Any) -> None:
        self.conn = conn
        self.id = stream_id
        self.mapping = mapping
        self.peer = peer
        self.protocol: Any = None
        self.connected = True
        self.disconnecting = False
        self.reset_code: int | None = None  # set when the peer reset the stream
        # sending
        self._send: deque[bytes] = deque()  # chunks waiting for credit or for the tunnel
        self._pending = 0  # bytes in _send (from _offset on)
        self._offset = 0  # bytes of _send[0] already sent
        self._write_closing = False  # CLOSE is due once _send is empty
        self._close_sent = False
        self._queued = False  # in the connection's round-robin queue
        self.producer: Any = None
        self._streaming = True
        self._producer_paused = False
        # receiving
        self._paused = False
        self._recv: deque[bytes | None] = deque()
        self._unconsumed = 0  # delivered downstream while it was paused
        self._eof_delivered = False
        self._lost = False
        self._linger: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<TunnelStream {self.id} {self.mapping}>"

    # --- set-up ---

    def attach(self, protocol: Any) -> None:
        """Connect ``protocol`` to this stream (calls its ``makeConnection``)."""
        self.protocol = protocol
        protocol.makeConnection(self)

    # --- ITransport ---

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer; they leave as credit and the tunnel allow."""
        if not data or self._write_closing or self._lost:
            return
        conn = self.conn
        if type(data) is not bytes:
            data = bytes(data)
        if (not self._send and not conn._ready and not conn._transport_paused
                and not conn._flushing and conn.connected):
            # nothing else waits to be sent: frame what the credit allows at once
            wire, taken = conn.mux.send_data_wire(self.id, data)
            if wire:
                conn._write(wire)
            if taken == len(data):
                return
            self._send.append(data)
            self._offset = taken
            self._pending += len(data) - taken
        else:
            self._send.append(data)
            self._pending += len(data)
        conn._want_send(self)
        if self._pending > HIGH_WATER and self.producer is not None and not self._producer_paused:
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def loseWriteConnection(self) -> None:
        """Half-close: ``CLOSE`` after what is buffered; the other direction keeps flowing."""
        if self._write_closing or self._lost:
            return
        self._write_closing = True
        self.conn._want_send(self)

    def loseConnection(self) -> None:
        """Send what is buffered, then ``CLOSE``; the protocol is told the connection is lost."""
        if self.disconnecting or self._lost:
            return
        self.disconnecting = True
        self._recv.clear()
        self._write_closing = True
        self.conn._want_send(self)

    def abortConnection(self) -> None:
        """``RESET`` the stream at once, dropping what is buffered both ways."""
        if self._lost:
            return
        self._send.clear()
        self._pending = self._offset = 0
        self.conn._send(self.conn.mux.reset_stream(self.id, ResetCode.CANCEL))
        self._finish(Failure(error.ConnectionAborted()))

    def reset(self, code: int) -> None:
        """``RESET`` the stream with a code (e.g. ``CONNECT_FAILED``) and drop it."""
        if self._lost:
            return
        self._send.clear()
        self._pending = self._offset = 0
        self.conn._send(self.conn.mux.reset_stream(self.id, code))
        self._finish(Failure(error.ConnectionLost(f"stream reset ({_reset_name(code)})")))

    def getPeer(self) -> Any:
        return self.peer if self.peer is not None else self.conn.transport.getPeer()

    def getHost(self) -> Any:
        return self.conn.transport.getHost()

    # --- IConsumer: the local side that writes into the stream ---

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"a producer is already registered on {self!r}")
        if self._lost:
            producer.stopProducing()
            return
        self.producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if self._pending > HIGH_WATER:
            self._producer_paused = True
            producer.pauseProducing()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # --- IPushProducer: the local side that reads from the stream ---

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._lost or not self._paused:
            return
        self._paused = False
        self._consume()
        while self._recv and not self._paused and not self._lost:
            item = self._recv.popleft()
            if item is _EOF:
                self._deliver_eof()
            else:
                self._deliver(item)

    def stopProducing(self) -> None:
        self.loseConnection()

    # --- from the connection: received ---

    def _data(self, data: bytes) -> None:
        if self.disconnecting or self._lost:
            self.conn._send(self.conn.mux.consume(self.id, len(data)))
        elif self._paused or self._recv:
            self._recv.append(data)
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        self._unconsumed += len(data)
        self.protocol.dataReceived(data)
        if not self._paused:
            self._consume()

    def _consume(self) -> None:
        count, self._unconsumed = self._unconsumed, 0
        if count:
            self.conn._send(self.conn.mux.consume(self.id, count))

    def _remote_closed(self) -> None:
        if self.disconnecting or self._lost:
            self._maybe_forget()
        elif self._paused or self._recv:
            self._recv.append(_EOF)
        else:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        self._eof_delivered = True
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
            if self._close_sent:
                self._finish(Failure(error.ConnectionDone()))
        else:
            self.loseConnection()

    def _remote_reset(self, code: int) -> None:
        self.reset_code = code
        self._send.clear()
        self._pending = self._offset = 0
        self._finish(Failure(StreamResetError(code)))

    def _connection_gone(self, reason: Failure) -> None:
        self._send.clear()
        self._pending = self._offset = 0
        self._finish(reason)

    # --- from the connection: sending ---

    def _wants_send(self) -> bool:
        if self._lost:
            return False
        if self._send:
            return self.conn.mux.send_window(self.id) > 0
        return self._write_closing and not self._close_sent

    def _take_wire(self, limit: int) -> bytes:
        """Wire bytes to send now: up to ``limit`` bytes of DATA (credit allowing), then the
        CLOSE once drained."""
        mux = self.conn.mux
        wire = b""
        if self._send:
            limit = min(limit, mux.send_window(self.id))
            if limit:
                wire, _taken = mux.send_data_wire(self.id, self._take(limit))
                if (self._producer_paused and self._pending <= LOW_WATER
                        and self.producer is not None):
                    self._producer_paused = False
                    self.producer.resumeProducing()
        if not self._send and self._write_closing and not self._close_sent and not self._lost:
            self._close_sent = True
            close = mux.close_stream(self.id)
            if close:
                wire += encode_all(close)
        return wire

    def _take(self, limit: int) -> bytes | memoryview:
        """Up to ``limit`` queued bytes: whole chunks or views of them, copying only to join
        several small ones.

        A chunk larger than ``limit`` is consumed through an offset (never re-sliced whole), so a
        single huge write costs one copy of each byte (when it is framed).
        """
        queue = self._send
        first = queue[0]
        start = self._offset
        if len(first) - start > limit:
            self._offset = start + limit
            self._pending -= limit
            return memoryview(first)[start:start + limit]
        queue.popleft()
        self._offset = 0
        piece: bytes | memoryview = memoryview(first)[start:] if start else first
        size = len(piece)
        if not queue or size + len(queue[0]) > limit:
            self._pending -= size
            return piece
        pieces = [piece]
        while queue and size + len(queue[0]) <= limit:
            size += len(queue[0])
            pieces.append(queue.popleft())
        self._pending -= size
        return b"".join(pieces)

    def _after_send(self) -> None:
        """Called once the bytes of :meth:`_take_wire` were written."""
        if self._close_sent and not self._lost and (self.disconnecting or self._eof_delivered):
            self._finish(Failure(error.ConnectionDone()))

    # --- end ---

    def _finish(self, reason: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self.disconnecting = True
        self._recv.clear()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self._maybe_forget()
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(reason)

    def _maybe_forget(self) -> None:
        conn = self.conn
        if not conn.mux.has_stream(self.id):
            conn._forget(self)
            if self._linger is not None and self._linger.active():
                self._linger.cancel()
            self._linger = None
        elif self._lost and self._linger is None and conn.connected:
            # closed here, the peer has not closed its side yet: reset it if it never does
            self._linger = conn.clock.callLater(CLOSE_GRACE, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if self.conn.mux.has_stream(self.id):
            self.conn._send(self.conn.mux.reset_stream(self.id, ResetCode.CANCEL))
        self.conn._forget(self)


@implementer(IPushProducer)
class TunnelConnection(Protocol):
    """One tunnel connection at either end; subclasses give it its role.

    ``clock`` schedules heartbeats and timeouts.  ``window`` is the credit granted per stream,
    ``max_streams`` caps open streams, ``chunk`` is the largest ``DATA`` frame sent (and what a
    stream sends per turn while others wait).  ``max_window`` and ``window_budget`` bound the
    window auto-tuning of :class:`~wmproxy_tw.tunnel.session.Multiplexer` (per stream, and in
    total over the connection's streams).
    """

    transport: Any

    def __init__(self, clock: IReactorTime, is_client: bool, *,
                 heartbeat_interval: float = 10.0, heartbeat_timeout: float = 30.0,
                 window: int = DEFAULT_WINDOW, max_streams: int = 1024,
                 chunk: int = MAX_DATA_PAYLOAD, max_window: int = MAX_STREAM_WINDOW,
                 window_budget: int = WINDOW_BUDGET) -> None:
        self.clock = clock
        self.mux = Multiplexer(is_client, window, max_streams, chunk,
                               max_window=max(window, max_window), window_budget=window_budget)
        self.decoder = FrameDecoder()
        self.chunk = chunk
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat: Heartbeat | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.connected = False
        self.rtt: float | None = None
        self._ready: deque[TunnelStream] = deque()
        self._transport_paused = False
        self._flushing = False
        self._closing = False
        self._timer: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._draining = False
        self._drain_call: IDelayedCall | None = None
        self._batch: list[bytes] | None = None  # writes held while a read is processed
        self._batched = 0

    # --- description, for logs ---

    @property
    def label(self) -> str:
        """Who is at the other end (peer address), for log lines."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return address_text(peer) or "?"

    # --- Protocol ---

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)
        # A TCP transport pauses its producer above bufferSize (64 KiB) buffered bytes, which a
        # single 64 KiB DATA frame plus its header exceeds: every frame would be its own send().
        # Several frames per send, and larger reads, on the shared link.
        socket_transport = getattr(self.transport, "transport", self.transport)  # below TLS
        if isinstance(getattr(socket_transport, "bufferSize", None), int):
            socket_transport.bufferSize = LINK_BUFFER
            if getattr(socket_transport, "SEND_LIMIT", LINK_BUFFER) < LINK_BUFFER:
                socket_transport.SEND_LIMIT = LINK_BUFFER

        self._timer = self.clock.callLater(min(HANDSHAKE_TIMEOUT, self.heartbeat_timeout),
                                           self._handshake_timeout)
        self.tunnel_made()

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self.mux.is_closed:
            return
        if self.heartbeat is not None:
            self.heartbeat.received(self.clock.seconds())
        # What this read makes us send (credit, DATA released by it, replies) leaves in one write.
        self._batch = []
        try:
            mux = self.mux
            streams = self.streams
            for item in self.decoder.feed_data(data):
                if self._closing:
                    return
                if isinstance(item, tuple):  # DATA bytes of one stream: the fast path
                    stream_id, payload = item
                    if mux.receive_data(stream_id, payload):
                        stream = streams.get(stream_id)
                        if stream is None:
                            self._send(mux.consume(stream_id, len(payload)))
                        else:
                            stream._data(payload)
                    continue
                for event in mux.receive_frame(item):
                    self._event(event)
        except TunnelProtocolError as exc:
            self.protocol_error(exc)
        finally:
            self._end_batch()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self._closing = True
        for call in (self._timer, self._abort_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort_call = self._drain_call = None
        gone = Failure(error.ConnectionLost("the tunnel connection closed"))
        for stream in list(self.streams.values()):
            stream._connection_gone(gone)
            if stream._linger is not None and stream._linger.active():
                stream._linger.cancel()
        self.streams.clear()
        self._ready.clear()
        self.tunnel_lost(reason if reason is not None else Failure(error.ConnectionDone()))

    # --- IPushProducer: the tunnel transport tells us when it is full ---

    def pauseProducing(self) -> None:
        self._transport_paused = True

    def resumeProducing(self) -> None:
        self._transport_paused = False
        self._flush()

    def stopProducing(self) -> None:
        self._transport_paused = True

    # --- sending ---

    def _send(self, frames: list[Frame]) -> None:
        """Write control frames now (never held back by flow control)."""
        if frames and self.connected:
            self._write(encode_all(frames))

    def _write(self, wire: bytes) -> None:
        """Write encoded frames, in order: held in the batch while a read is processed."""
        batch = self._batch
        if batch is None:
            self.transport.write(wire)
            return
        batch.append(wire)
        self._batched += len(wire)
        if self._batched >= LINK_BUFFER:  # let the transport see it (and pause us when full)
            self._end_batch()
            self._batch = []

    def _end_batch(self) -> None:
        batch, self._batch = self._batch, None
        self._batched = 0
        if batch and self.connected:
            self.transport.writeSequence(batch)

    def _want_send(self, stream: TunnelStream) -> None:
        if not stream._queued:
            stream._queued = True
            self._ready.append(stream)
        self._flush()

    def _flush(self) -> None:
        """Send DATA round-robin over the streams that have data and credit."""
        if self._flushing or not self.connected:
            return
        self._flushing = True
        try:
            ready = self._ready
            while ready and not self._transport_paused and self.connected:
                stream = ready.popleft()
                stream._queued = False
                wire = stream._take_wire(self.chunk if ready else max(self.chunk, TURN))
                if wire:
                    self._write(wire)
                stream._after_send()
                if stream._wants_send() and not stream._queued:
                    stream._queued = True
                    ready.append(stream)
        finally:
            self._flushing = False

    # --- streams ---

    def open_stream(self, mapping: str, peer: Any = None) -> TunnelStream:
        """Open a stream to the peer; raises :class:`TunnelStateError` when none can be opened."""
        if self._closing:
            raise TunnelStateError("the tunnel is closing")
        stream_id, frames = self.mux.open_stream(mapping, address_text(peer))
        stream = TunnelStream(self, stream_id, mapping, peer)
        self.streams[stream_id] = stream
        self._send(frames)
        return stream

    def _forget(self, stream: TunnelStream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if self._draining and not self.streams:
                self._close()

    # --- events ---

    def _event(self, event: Event) -> None:
        if isinstance(event, StreamData):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self._send(self.mux.consume(event.stream_id, len(event.data)))
            else:
                stream._data(event.data)
        elif isinstance(event, WindowOpened):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream._wants_send():
                self._want_send(stream)
        elif isinstance(event, Reply):
            self._send([event.frame])
        elif isinstance(event, StreamClosed):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._remote_closed()
        elif isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._remote_reset(event.code)
        elif isinstance(event, StreamOpened):
            stream = TunnelStream(self, event.stream_id, event.mapping,
                                  peer_address(event.peer))
            self.streams[event.stream_id] = stream
            self.stream_opened(stream)
        elif isinstance(event, PongReceived):
            if self.heartbeat is not None:
                self.rtt = self.heartbeat.pong_received(event.payload, self.clock.seconds())
        elif isinstance(event, PingReceived):
            pass  # the PONG is in the Reply that follows
        elif isinstance(event, GoAwayReceived):
            self.go_away_received(event.code, event.message)
        elif isinstance(event, ErrorReceived):
            _log.warn("tunnel {peer}: the peer reported an error: {code}: {message}",
                      peer=self.label, code=_code_name(event.code), message=event.message)
            self._close()
        elif isinstance(event, HelloReceived | HelloAccepted | AuthRejected | RegisterReceived
                        | RegistrationAccepted | RegistrationRefused):
            self.session_event(event)

    # --- heartbeats ---

    def start_heartbeat(self, interval: float | None = None) -> None:
        """The session is open: ping when idle, declare the peer dead after the timeout."""
        timeout = self.heartbeat_timeout
        interval = self.heartbeat_interval if interval is None else interval
        if interval >= timeout:
            interval = timeout / 3
        self.heartbeat = Heartbeat(interval, timeout, self.clock.seconds())
        self._schedule_heartbeat()

    def _schedule_heartbeat(self) -> None:
        assert self.heartbeat is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = max(0.0, self.heartbeat.next_wakeup() - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._heartbeat_tick)

    def _heartbeat_tick(self) -> None:
        self._timer = None
        heartbeat = self.heartbeat
        if heartbeat is None or self._closing:
            return
        now = self.clock.seconds()
        if heartbeat.peer_dead(now):
            _log.warn("tunnel {peer}: nothing received for {t:g}s: the peer is dead",
                      peer=self.label, t=heartbeat.timeout)
            if self.mux.is_open:
                self._send(self.mux.go_away(ErrorCode.HEARTBEAT_TIMEOUT,
                                            "nothing received within heartbeat_timeout"))
            self.heartbeat_expired()
            self.transport.abortConnection()
            return
        if heartbeat.ping_due(now) and self.mux.is_open:
            self._send(self.mux.ping(heartbeat.make_ping(now).payload))
        self._schedule_heartbeat()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.mux.is_open and not self._closing:
            _log.info("tunnel {peer}: no handshake in time: closing", peer=self.label)
            self.transport.abortConnection()

    # --- closing ---

    def protocol_error(self, exc: TunnelProtocolError) -> None:
        """The peer broke the protocol: send ERROR and close."""
        _log.warn("tunnel {peer}: protocol error: {error}", peer=self.label, error=str(exc))
        self._send(self.mux.fail(exc))
        self._close()

    def go_away(self, message: str = "shutting down") -> None:
        """Announce shutdown: no new streams; close once the open ones have ended."""
        if self.mux.is_open and not self.mux.local_going_away:
            self._send(self.mux.go_away(ErrorCode.NO_ERROR, message))
        self._drain()

    def _drain(self) -> None:
        """Close when no stream is left, or after :data:`CLOSE_GRACE` in any case."""
        if self._closing or not self.connected:
            return
        self._draining = True
        if not self.streams:
            self._close()
        elif self._drain_call is None:
            self._drain_call = self.clock.callLater(CLOSE_GRACE, self._close)

    def _close(self) -> None:
        if self._closing or not self.connected:
            return
        self._closing = True
        self._end_batch()
        self.transport.loseConnection()
        self._abort_call = self.clock.callLater(CLOSE_GRACE, self._abort_now)

    def _abort_now(self) -> None:
        self._abort_call = None
        if self.connected:
            self.transport.abortConnection()

    # --- hooks for the role ---

    def tunnel_made(self) -> None:
        """The transport is connected (client: send HELLO here)."""

    def session_event(self, event: Event) -> None:
        """Handshake and registration events (HELLO, HELLO_OK, REGISTER, ACCEPT, ...)."""

    def stream_opened(self, stream: TunnelStream) -> None:
        """The peer opened ``stream``: attach a protocol to it or :meth:`TunnelStream.reset` it."""
        stream.reset(ResetCode.UNKNOWN_MAPPING)

    def go_away_received(self, code: int, message: str) -> None:
        """The peer is shutting down: close once the open streams are done."""
        _log.info("tunnel {peer}: the peer goes away: {message}", peer=self.label,
                  message=message or _code_name(code))
        self._drain()

    def heartbeat_expired(self) -> None:
        """The peer is considered dead; the connection is aborted right after."""

    def tunnel_lost(self, reason: Failure) -> None:
        """The tunnel connection is gone (every stream was told already)."""


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


class _StreamSplice(SpliceProtocol):
    """An accepted connection relayed to a new tunnel stream (side A: the socket)."""

    transport: Any

    def __init__(self, factory: StreamSpliceFactory, addr: Any) -> None:
        super().__init__(Splice(factory.clock, idle_timeout=factory.idle_timeout), A)
        self.factory_ = factory
        self.addr = addr

    def connectionMade(self) -> None:
        try:
            stream = self.factory_.opener(self.addr)
        except TunnelStateError as exc:
            _log.info("{what}: cannot open a tunnel stream for {peer}: {why}",
                      what=self.factory_.what, peer=address_text(self.addr), why=str(exc))
            stream = None
        if isinstance(stream, Deferred):  # found later (a fleet lookup): the socket waits, paused
            super().connectionMade()
            stream.addCallback(self._opened)
            stream.addErrback(self._open_failed)
            return
        if stream is None:
            self.transport.loseConnection()
            return
        super().connectionMade()
        stream.attach(SpliceProtocol(self.splice, B))

    def _opened(self, stream: TunnelStream | None) -> None:
        if stream is not None and self.transport.connected and not self.transport.disconnecting:
            stream.attach(SpliceProtocol(self.splice, B))
        elif stream is not None:
            stream.abortConnection()
        else:
            self.transport.loseConnection()

    def _open_failed(self, failure: Failure) -> None:
        _log.failure("{what}: opening a stream for {peer}", failure, what=self.factory_.what,
                     peer=address_text(self.addr))
        self.transport.loseConnection()


class StreamSpliceFactory(Factory):
    """Relays each accepted connection over a stream that ``opener(peer_address)`` opens.

    ``opener`` returns the stream, or None (then the connection is closed at once: the client
    serving it is offline), or a Deferred of either (the socket waits, paused, meanwhile).  Bytes flow through :class:`~wmproxy_tw.relay.Splice`.
    """

    noisy = False

    def __init__(self, clock: IReactorTime, opener: Callable[[Any], Any],
                 idle_timeout: float | None, what: str) -> None:
        self.clock = clock
        self.opener = opener
        self.idle_timeout = idle_timeout
        self.what = what

    def buildProtocol(self, addr: Any) -> Protocol:
        return _StreamSplice(self, addr)
