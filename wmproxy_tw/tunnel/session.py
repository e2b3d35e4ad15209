"""Sans-IO tunnel session: handshake, stream multiplexing, flow control and heartbeats.

:class:`Multiplexer` is the state of one tunnel connection, the same class at both ends
(``is_client`` picks the role).  It never touches a socket or a clock: methods that act locally
return the frames to send, and :meth:`Multiplexer.receive_frame` turns one received frame into
application events.  Frames the protocol itself requires in answer (``PONG``, ``RESET(REFUSED)``)
come back as :class:`Reply` events, in order with the others.  A peer's violation raises
:class:`~wmproxy_tw.tunnel.frames.TunnelProtocolError`; answer it with :meth:`Multiplexer.fail`
and close the connection.  Local misuse raises :class:`TunnelStateError`.

:class:`Heartbeat` is the dead-peer detector, driven by ``now`` values the caller passes in.

See ``docs/tunnel-protocol.md`` for the rules enforced here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from wmproxy_tw.tunnel.frames import (
    DEFAULT_WINDOW,
    MAX_DATA_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    Accept,
    AuthFailed,
    Close,
    Data,
    Error,
    ErrorCode,
    Frame,
    GoAway,
    Hello,
    HelloOk,
    Open,
    Ping,
    Pong,
    Refuse,
    Register,
    Reset,
    ResetCode,
    TunnelProtocolError,
    WindowUpdate,
    encode_data,
    error_frame,
)

__all__ = [
    "AuthRejected",
    "ErrorReceived",
    "GROW_AFTER",
    "Event",
    "GoAwayReceived",
    "Heartbeat",
    "HelloAccepted",
    "HelloReceived",
    "Multiplexer",
    "PingReceived",
    "PongReceived",
    "RegisterReceived",
    "RegistrationAccepted",
    "RegistrationRefused",
    "Reply",
    "StreamClosed",
    "StreamData",
    "StreamOpened",
    "StreamReset",
    "TunnelStateError",
    "WindowOpened",
]


GROW_AFTER = 8
"""A stream's window may double once this many windows' worth was consumed since it last grew."""


class TunnelStateError(Exception):
    """The local application asked for something the session state does not allow."""


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Server side: the client's ``HELLO``; check its credentials, then accept or reject it."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class HelloAccepted:
    """Client side: the server accepted us; ping at ``heartbeat_ms`` when idle."""

    window: int
    heartbeat_ms: int


@dataclass(frozen=True, slots=True)
class AuthRejected:
    """Client side: the server refused our credentials and will close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class RegisterReceived:
    """Server side: the client asks to publish a mapping; answer accept or refuse."""

    register: Register


@dataclass(frozen=True, slots=True)
class RegistrationAccepted:
    """Client side: the mapping of that name is published."""

    name: str


@dataclass(frozen=True, slots=True)
class RegistrationRefused:
    """Client side: the mapping of that name was refused, with the server's reason."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream for a mapping (or ``@service``); ``peer`` is the public address."""

    stream_id: int
    mapping: str
    peer: str | None


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes for a stream; call :meth:`Multiplexer.consume` once they are delivered downstream."""

    stream_id: int
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"StreamData(stream_id={self.stream_id}, len={len(self.data)})"


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer half-closed the stream: no more data will come from it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream (both directions) with a :class:`ResetCode` value."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted credit: ``window`` bytes may now be sent; resume the stream's producer."""

    stream_id: int
    window: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged (the ``PONG`` is in the accompanying :class:`Reply`)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered one of our pings."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer opens and accepts no new streams; close once the open ones are done."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The peer reported a fatal protocol error; the session is closed, drop the connection."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame the protocol requires in answer to the received one: send it."""

    frame: Frame


Event = (HelloReceived | HelloAccepted | AuthRejected | RegisterReceived | RegistrationAccepted
         | RegistrationRefused | StreamOpened | StreamData | StreamClosed | StreamReset
         | WindowOpened | PingReceived | PongReceived | GoAwayReceived | ErrorReceived | Reply)
"""Anything :meth:`Multiplexer.receive_frame` reports."""


# --- the multiplexer ------------------------------------------------------------------------------


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class _Stream:
    """Book-keeping of one open stream."""

    send_window: int  # credit the peer granted us
    recv_window: int  # credit we granted the peer and it has not used yet
    window: int  # the receive window this stream has now (the initial one, or grown)
    unconsumed: int = 0  # delivered to the application, not yet consumed
    to_return: int = 0  # consumed, not yet returned by WINDOW_UPDATE
    consumed: int = 0  # consumed since the window last grew
    local_closed: bool = False
    remote_closed: bool = False


def _protocol_error(message: str) -> TunnelProtocolError:
    return TunnelProtocolError(ErrorCode.PROTOCOL_ERROR, message)


def _stream_error(message: str) -> TunnelProtocolError:
    return TunnelProtocolError(ErrorCode.STREAM_ERROR, message)


class Multiplexer:
    """State of one tunnel connection, at either end.

    ``initial_window`` is the credit this side grants the peer on every stream (announced in
    ``HELLO``/``HELLO_OK``); ``max_streams`` caps concurrently open streams, both directions
    together.  ``max_data_frame`` is the largest ``DATA`` payload this side sends.

    Window auto-tuning (off by default): with ``max_window`` above ``initial_window``, a stream
    whose reader consumed ``grow_after`` (:data:`GROW_AFTER`) windows' worth since its window
    last grew gets the window doubled (the extra credit rides on the next ``WINDOW_UPDATE``), up
    to ``max_window`` per stream and ``window_budget`` bytes of growth over all streams of the
    connection (given back when a stream ends).  Bulk streams thus reach large windows after a few MiB, short
    exchanges keep the initial one, and buffered data stays bounded by
    ``max_streams * initial_window + window_budget``: a reader that stalls early never grows its
    window, one that stalls later stops its stream at the window it has then.

    Stream operations (:meth:`send_data`, :meth:`close_stream`, :meth:`reset_stream`,
    :meth:`consume`) on a stream that is gone (reset, fully closed, or the whole session closed)
    do nothing, so local callbacks racing a ``RESET`` need no guard; an id that was never opened
    is a :class:`TunnelStateError`.
    """

    def __init__(self, is_client: bool, initial_window: int = DEFAULT_WINDOW,
                 max_streams: int = 1024, max_data_frame: int = MAX_DATA_PAYLOAD, *,
                 max_window: int | None = None, window_budget: int = 0) -> None:
        if not 1 <= initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be in 1..{MAX_WINDOW}")
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not 1 <= max_data_frame <= MAX_DATA_PAYLOAD:
            raise ValueError(f"max_data_frame must be in 1..{MAX_DATA_PAYLOAD}")
        max_window = initial_window if max_window is None else max_window
        if not initial_window <= max_window <= MAX_WINDOW:
            raise ValueError(f"max_window must be in initial_window..{MAX_WINDOW}")
        if window_budget < 0:
            raise ValueError("window_budget must not be negative")
        self.is_client = is_client
        self.initial_window = initial_window
        self.max_streams = max_streams
        self.max_data_frame = max_data_frame
        self.max_window = max_window
        self.window_budget = window_budget if max_window > initial_window else 0
        self._budget_left = self.window_budget
        self.grow_after = GROW_AFTER
        self.peer_window: int | None = None
        self._phase = _Phase.HANDSHAKE
        self._hello_done = False  # client: HELLO sent; server: HELLO received
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if is_client else 2
        self._last_remote_id = 0
        self._pending_registrations: set[str] = set()
        self._registered: set[str] = set()
        self.local_going_away = False
        self.remote_going_away = False

    # --- introspection ---

    @property
    def is_open(self) -> bool:
        """Handshake done and no fatal error or authentication failure since."""
        return self._phase is _Phase.OPEN

    @property
    def is_closed(self) -> bool:
        """The session is over (error sent or received, authentication refused)."""
        return self._phase is _Phase.CLOSED

    @property
    def stream_count(self) -> int:
        """Number of streams not yet fully closed or reset."""
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        """Ids of the streams not yet fully closed or reset."""
        return list(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        """Whether the stream is still tracked (not fully closed, not reset)."""
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream right now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None or stream.local_closed else stream.send_window

    def can_send(self, stream_id: int) -> bool:
        """Whether the stream exists and this side has not closed it."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.local_closed

    # --- handshake and registration (local side) ---

    def hello(self, *, client: str = "", token: str | None = None, username: str | None = None,
              password: str | None = None) -> list[Frame]:
        """Client: the ``HELLO`` that starts the connection."""
        if not self.is_client or self._hello_done or self._phase is not _Phase.HANDSHAKE:
            raise TunnelStateError("HELLO is sent once, by the client, first")
        frame = Hello(client=client, window=self.initial_window, token=token, username=username,
                      password=password)
        self._hello_done = True
        return [frame]

    def accept_hello(self, heartbeat_ms: int = 10_000) -> list[Frame]:
        """Server: the credentials are good; open the session."""
        self._check_pending_hello()
        self._phase = _Phase.OPEN
        return [HelloOk(window=self.initial_window, heartbeat_ms=heartbeat_ms)]

    def reject_hello(self, reason: str) -> list[Frame]:
        """Server: refuse the credentials; close the connection after sending this."""
        self._check_pending_hello()
        self._phase = _Phase.CLOSED
        return [AuthFailed(reason)]

    def _check_pending_hello(self) -> None:
        if self.is_client or not self._hello_done or self._phase is not _Phase.HANDSHAKE:
            raise TunnelStateError("no HELLO is waiting for an answer")

    def register(self, name: str, mode: str, domains: tuple[str, ...] = (),
                 remote_port: int | None = None, headers: tuple[str, ...] = ()) -> list[Frame]:
        """Client: ask the server to publish a mapping."""
        self._require_open()
        if not self.is_client:
            raise TunnelStateError("only the client registers mappings")
        if name in self._pending_registrations or name in self._registered:
            raise TunnelStateError(f"mapping {name!r} is already registered or pending")
        frame = Register(name, mode, tuple(domains), remote_port, tuple(headers))
        self._pending_registrations.add(name)
        return [frame]

    def accept_registration(self, name: str) -> list[Frame]:
        """Server: the mapping is published."""
        self._take_pending_registration(name)
        self._registered.add(name)
        return [Accept(name)]

    def refuse_registration(self, name: str, reason: str) -> list[Frame]:
        """Server: the mapping is refused, e.g. ``domain 'a.example' is held by client 'x'``."""
        frame = Refuse(name, reason)
        self._take_pending_registration(name)
        return [frame]

    def _take_pending_registration(self, name: str) -> None:
        self._require_open()
        if self.is_client or name not in self._pending_registrations:
            raise TunnelStateError(f"no registration of {name!r} is waiting for an answer")
        self._pending_registrations.discard(name)

    # --- streams (local side) ---

    def open_stream(self, mapping: str, peer: str | None = None) -> tuple[int, list[Frame]]:
        """Open a new stream; returns its id and the ``OPEN`` frame.

        Raises :class:`TunnelStateError` when the stream limit is reached, after ``GOAWAY`` in
        either direction, or when ids are exhausted: refuse the public connection then.
        """
        self._require_open()
        if self.local_going_away or self.remote_going_away:
            raise TunnelStateError("no new streams after GOAWAY")
        if len(self._streams) >= self.max_streams:
            raise TunnelStateError(f"stream limit of {self.max_streams} reached")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise TunnelStateError("stream ids exhausted; send GOAWAY and reconnect")
        frame = Open(stream_id, mapping, peer)
        self._next_local_id += 2
        assert self.peer_window is not None  # set by the handshake
        self._streams[stream_id] = _Stream(self.peer_window, self.initial_window,
                                           self.initial_window)
        return stream_id, [frame]

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview,
                  ) -> tuple[list[Frame], bytes]:
        """Frame as much of ``data`` as the peer's credit allows.

        Returns the ``DATA`` frames to send now and the bytes that must wait for a
        :class:`WindowOpened` event (pause the producer meanwhile).  A stream that the peer reset
        (or that closed), or any stream of a closed session, accepts nothing and returns no
        remainder: its data is discarded.
        """
        stream = self._stream_for_local_op(stream_id)
        if stream is None:
            return [], b""
        if stream.local_closed:
            raise TunnelStateError(f"stream {stream_id} was closed by this side")
        step = self.max_data_frame
        if type(data) is bytes and 0 < len(data) <= min(step, stream.send_window):
            stream.send_window -= len(data)  # the common case: one frame, no copy
            return [Data(stream_id, data)], b""
        view = memoryview(data).cast("B")
        count = min(len(view), stream.send_window)
        frames: list[Frame] = [Data(stream_id, bytes(view[i:min(i + step, count)]))
                               for i in range(0, count, step)]
        stream.send_window -= count
        return frames, bytes(view[count:])

    def send_data_wire(self, stream_id: int, data: bytes | bytearray | memoryview,
                       ) -> tuple[bytes, int]:
        """:meth:`send_data` for the data path: ``(wire bytes, count taken from data)``.

        Frames as much of ``data`` as the credit allows, like :meth:`send_data`, but returns the
        encoded ``DATA`` frames as one buffer and how many bytes of ``data`` they carry (the
        caller keeps the rest); no frame objects, one copy.  A stream that is gone takes
        everything and sends nothing (``(b"", len(data))``).
        """
        stream = self._stream_for_local_op(stream_id)
        if stream is None:
            return b"", len(data)
        if stream.local_closed:
            raise TunnelStateError(f"stream {stream_id} was closed by this side")
        count = min(len(data), stream.send_window)
        if count <= 0:
            return b"", 0
        stream.send_window -= count
        if count < len(data):
            data = memoryview(data).cast("B")[:count]
        return encode_data(stream_id, data, self.max_data_frame), count

    def close_stream(self, stream_id: int) -> list[Frame]:
        """Half-close: this side sends no more data on the stream (idempotent)."""
        stream = self._stream_for_local_op(stream_id)
        if stream is None or stream.local_closed:
            return []
        stream.local_closed = True
        if stream.remote_closed:
            self._drop(stream_id)
        return [Close(stream_id)]

    def reset_stream(self, stream_id: int, code: int = ResetCode.CANCEL) -> list[Frame]:
        """Abort both directions of the stream (nothing to do if it is already gone)."""
        if self._stream_for_local_op(stream_id) is None:
            return []
        frame = Reset(stream_id, code)
        self._drop(stream_id)
        return [frame]

    def _drop(self, stream_id: int) -> None:
        """Forget a stream; the window it grew goes back to the connection's budget."""
        stream = self._streams.pop(stream_id)
        self._budget_left += stream.window - self.initial_window

    def consume(self, stream_id: int, count: int) -> list[Frame]:
        """Report ``count`` received bytes as delivered downstream; may return a WINDOW_UPDATE.

        Credit is returned once at least half the stream's window has been consumed, so a reader
        that stops consuming stops the peer's sender on this stream only.  With auto-tuning (see
        the class), the update may also grow the window.
        """
        stream = self._stream_for_local_op(stream_id)
        if stream is None:
            return []
        if not 0 <= count <= stream.unconsumed:
            raise TunnelStateError(f"stream {stream_id}: consuming {count} bytes but only "
                                   f"{stream.unconsumed} are unconsumed")
        stream.unconsumed -= count
        stream.to_return += count
        stream.consumed += count
        if stream.remote_closed or stream.to_return < max(1, stream.window >> 1):
            return []
        increment, stream.to_return = stream.to_return, 0
        if stream.consumed >= self.grow_after * stream.window:
            grow = min(stream.window, self.max_window - stream.window, self._budget_left)
            if grow > 0:
                stream.window += grow
                stream.consumed = 0
                self._budget_left -= grow
                increment += grow
        stream.recv_window += increment
        return [WindowUpdate(stream_id, increment)]

    # --- connection (local side) ---

    def ping(self, payload: bytes) -> list[Frame]:
        """A heartbeat ``PING`` (see :meth:`Heartbeat.make_ping`)."""
        self._require_open()
        return [Ping(payload)]

    def go_away(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> list[Frame]:
        """Announce shutdown: no new streams either way; open ones may finish."""
        self._require_open()
        frame = GoAway(code, message)
        self.local_going_away = True
        return [frame]

    def fail(self, exc: TunnelProtocolError) -> list[Frame]:
        """Close the session because of a protocol error; returns the ``ERROR`` to send."""
        self._phase = _Phase.CLOSED
        self._streams.clear()
        self._budget_left = self.window_budget
        return [error_frame(exc)]

    def _require_open(self) -> None:
        if self._phase is not _Phase.OPEN:
            raise TunnelStateError(f"session is not open ({self._phase.value})")

    def _stream_for_local_op(self, stream_id: int) -> _Stream | None:
        """The stream, ``None`` if it is gone (or the session closed); never-opened is misuse."""
        if self._phase is _Phase.CLOSED:
            return None
        stream = self._streams.get(stream_id)
        if stream is None and not self._was_opened(stream_id):
            raise TunnelStateError(f"stream {stream_id} was never opened")
        return stream

    # --- stream ids ---

    def _is_remote_id(self, stream_id: int) -> bool:
        """Client-initiated ids are odd, server-initiated ids even."""
        return (stream_id % 2 == 1) != self.is_client

    def _was_opened(self, stream_id: int) -> bool:
        if self._is_remote_id(stream_id):
            return 0 < stream_id <= self._last_remote_id
        return 0 < stream_id < self._next_local_id

    # --- receiving ---

    def receive_frame(self, frame: Frame) -> list[Event]:
        """Apply one frame from the peer; return what the application must know or send.

        Raises :class:`TunnelProtocolError` when the frame breaks the protocol.  After the
        session closed, frames are ignored.
        """
        if self._phase is _Phase.CLOSED:
            return []
        if isinstance(frame, Error):
            self._phase = _Phase.CLOSED
            self._streams.clear()
            self._budget_left = self.window_budget
            return [ErrorReceived(frame.code, frame.message)]
        if self._phase is _Phase.HANDSHAKE:
            return self._receive_handshake(frame)
        if isinstance(frame, Data):
            return self._receive_data(frame)
        if isinstance(frame, WindowUpdate):
            return self._receive_window_update(frame)
        if isinstance(frame, Open):
            return self._receive_open(frame)
        if isinstance(frame, Close):
            return self._receive_close(frame)
        if isinstance(frame, Reset):
            if self._stream_for_remote_frame(frame) is None:
                return []
            self._drop(frame.stream_id)
            return [StreamReset(frame.stream_id, frame.code)]
        if isinstance(frame, Ping):
            return [PingReceived(frame.payload), Reply(Pong(frame.payload))]
        if isinstance(frame, Pong):
            return [PongReceived(frame.payload)]
        if isinstance(frame, GoAway):
            self.remote_going_away = True
            return [GoAwayReceived(frame.code, frame.message)]
        return self._receive_registration(frame)

    def _receive_handshake(self, frame: Frame) -> list[Event]:
        name = type(frame).__name__
        if not self.is_client:
            if self._hello_done:
                raise _protocol_error(f"{name} before the HELLO was answered")
            if not isinstance(frame, Hello):
                raise _protocol_error(f"expected HELLO as the first frame, got {name}")
            self._hello_done = True
            self.peer_window = frame.window
            return [HelloReceived(frame)]
        if not self._hello_done:
            raise _protocol_error(f"{name} received before our HELLO")
        if isinstance(frame, HelloOk):
            self.peer_window = frame.window
            self._phase = _Phase.OPEN
            return [HelloAccepted(frame.window, frame.heartbeat_ms)]
        if isinstance(frame, AuthFailed):
            self._phase = _Phase.CLOSED
            return [AuthRejected(frame.reason)]
        raise _protocol_error(f"expected HELLO_OK or AUTH_FAILED, got {name}")

    def _receive_registration(self, frame: Frame) -> list[Event]:
        name = type(frame).__name__
        if isinstance(frame, Register) and not self.is_client:
            if frame.name in self._pending_registrations or frame.name in self._registered:
                raise _protocol_error(f"mapping {frame.name!r} registered twice")
            self._pending_registrations.add(frame.name)
            return [RegisterReceived(frame)]
        if isinstance(frame, Accept | Refuse) and self.is_client:
            if frame.name not in self._pending_registrations:
                raise _protocol_error(f"{name} for {frame.name!r}, which is not pending")
            self._pending_registrations.discard(frame.name)
            if isinstance(frame, Accept):
                self._registered.add(frame.name)
                return [RegistrationAccepted(frame.name)]
            return [RegistrationRefused(frame.name, frame.reason)]
        side = "client" if self.is_client else "server"
        raise _protocol_error(f"{name} is not allowed here (this side is the {side})")

    def _receive_open(self, frame: Open) -> list[Event]:
        stream_id = frame.stream_id
        if not self._is_remote_id(stream_id):
            raise _stream_error(f"OPEN {stream_id}: wrong parity for a stream the peer opens")
        if stream_id <= self._last_remote_id:
            raise _stream_error(f"OPEN {stream_id}: ids must increase "
                                f"(last was {self._last_remote_id})")
        self._last_remote_id = stream_id
        if self.local_going_away or len(self._streams) >= self.max_streams:
            return [Reply(Reset(stream_id, ResetCode.REFUSED))]
        assert self.peer_window is not None  # set by the handshake
        self._streams[stream_id] = _Stream(self.peer_window, self.initial_window,
                                           self.initial_window)
        return [StreamOpened(stream_id, frame.mapping, frame.peer)]

    def _stream_for_remote_frame(self, frame: Data | WindowUpdate | Close | Reset,
                                 ) -> _Stream | None:
        stream = self._streams.get(frame.stream_id)
        if stream is None and not self._was_opened(frame.stream_id):
            raise _stream_error(f"{type(frame).__name__} for stream {frame.stream_id}, "
                                "which was never opened")
        return stream

    def _receive_data(self, frame: Data) -> list[Event]:
        if not self.receive_data(frame.stream_id, frame.data):
            return []  # crossed our RESET on the wire
        return [StreamData(frame.stream_id, frame.data)]

    def receive_data(self, stream_id: int, data: bytes) -> bool:
        """The fast path of :meth:`receive_frame` for DATA bytes (:meth:`FrameDecoder.feed_data`).

        ``data`` is any part of the stream's DATA payloads: one frame's, several consecutive
        frames' joined, or a piece of one; credit is checked and used byte for byte, as for
        whole frames.  Returns True when the stream takes the bytes (deliver them, then
        :meth:`consume`), False when it is gone (a RESET crossed on the wire, or the session is
        closed).  Raises :class:`TunnelProtocolError` as :meth:`receive_frame` would.
        """
        if self._phase is not _Phase.OPEN:
            if self._phase is _Phase.CLOSED:
                return False
            raise _protocol_error("Data is not allowed before the handshake is done")
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._was_opened(stream_id):
                raise _stream_error(f"Data for stream {stream_id}, which was never opened")
            return False
        if stream.remote_closed:
            raise _stream_error(f"DATA on stream {stream_id} after its CLOSE")
        size = len(data)
        if size > stream.recv_window:
            raise TunnelProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"DATA of {size} bytes on stream {stream_id} exceeds the "
                f"{stream.recv_window} bytes of credit granted")
        stream.recv_window -= size
        stream.unconsumed += size
        return True

    def _receive_window_update(self, frame: WindowUpdate) -> list[Event]:
        stream = self._stream_for_remote_frame(frame)
        if stream is None:
            return []
        window = stream.send_window + frame.increment
        if window > MAX_WINDOW:
            raise TunnelProtocolError(ErrorCode.FLOW_CONTROL_ERROR,
                                      f"window of stream {frame.stream_id} above {MAX_WINDOW}")
        stream.send_window = window
        if stream.local_closed:
            return []
        return [WindowOpened(frame.stream_id, window)]

    def _receive_close(self, frame: Close) -> list[Event]:
        stream = self._stream_for_remote_frame(frame)
        if stream is None:
            return []
        if stream.remote_closed:
            raise _stream_error(f"CLOSE on stream {frame.stream_id} twice")
        stream.remote_closed = True
        if stream.local_closed:
            self._drop(frame.stream_id)
        return [StreamClosed(frame.stream_id)]


# --- heartbeats -----------------------------------------------------------------------------------


class Heartbeat:
    """Dead-peer detection as pure book-keeping over the ``now`` values the caller supplies.

    Call :meth:`received` whenever anything arrives from the peer.  A ``PING`` is due when
    nothing arrived for ``interval`` seconds (and again every ``interval`` while silence lasts);
    the peer is dead when nothing arrived for ``timeout`` seconds.  Schedule the next check at
    :meth:`next_wakeup`.
    """

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        if not 0 < interval < timeout:
            raise ValueError("heartbeat needs 0 < interval < timeout")
        self.interval = interval
        self.timeout = timeout
        self.last_received = now
        self.last_ping_sent: float | None = None
        self._counter = 0
        self._outstanding: tuple[bytes, float] | None = None

    def received(self, now: float) -> None:
        """Something (any frame) arrived from the peer at ``now``."""
        self.last_received = max(self.last_received, now)

    def next_ping_at(self) -> float:
        """When the next ``PING`` is due if nothing arrives meanwhile."""
        base = self.last_received
        if self.last_ping_sent is not None:
            base = max(base, self.last_ping_sent)
        return base + self.interval

    def ping_due(self, now: float) -> bool:
        """Whether a ``PING`` should be sent at ``now``."""
        return now >= self.next_ping_at()

    def make_ping(self, now: float) -> Ping:
        """A ``PING`` with a fresh payload, recorded as sent at ``now``."""
        self._counter += 1
        payload = struct.pack("!Q", self._counter % 2**64)
        self.last_ping_sent = now
        self._outstanding = (payload, now)
        return Ping(payload)

    def pong_received(self, payload: bytes, now: float) -> float | None:
        """Round-trip time if ``payload`` answers our latest ``PING``, else ``None``."""
        if self._outstanding is None or self._outstanding[0] != payload:
            return None
        sent = self._outstanding[1]
        self._outstanding = None
        return now - sent

    def deadline(self) -> float:
        """When the peer is declared dead if nothing arrives meanwhile."""
        return self.last_received + self.timeout

    def peer_dead(self, now: float) -> bool:
        """Whether nothing arrived within ``timeout`` before ``now``."""
        return now >= self.deadline()

    def next_wakeup(self) -> float:
        """The earliest time at which :meth:`ping_due` or :meth:`peer_dead` can change."""
        return min(self.next_ping_at(), self.deadline())
