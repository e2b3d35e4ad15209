"""The one WebSocket ⇄ TCP bridge, shared by tcp2ws / tcp2wss and ws2tcp.

A :class:`Bridge` joins a TCP connection and a WebSocket connection with the
one relay (:class:`wmproxy_tw.relay.Splice`).  The WebSocket side is presented
to the splice as an ordinary leg by :class:`WsLeg`: ``write`` sends one binary
message, ``loseConnection`` sends a close frame, and the producer methods act
on the WebSocket's own transport.  So back-pressure is Twisted's, both ways:

* TCP → WebSocket: the TCP transport is the registered streaming producer of
  the WebSocket's transport (for wss, of the TLS layer, which passes it on).
  When that write buffer goes over its high-water mark (the transport's
  ``bufferSize``, 64 KiB) the TCP transport is paused (stops reading); it is
  resumed when the buffer has drained.  autobahn writes straight to its
  transport (we never use its ``sync``/chopped send queue), so there is no
  other buffer on the way.
* WebSocket → TCP: the WebSocket leg is the producer of the TCP transport; a
  slow TCP reader pauses reading from the WebSocket socket.  Frames are passed
  on as they arrive (``onMessageFrameData``), not assembled into whole
  messages, so at most one read is in memory per connection; the size limits
  still apply (close 1009).  While reading is paused the ping timeout is
  suspended (a pong cannot be read then: the peer is not at fault).

Closing: a clean TCP close (EOF) sends close 1000 and lets the WebSocket peer
finish (its data still reaches TCP until its close reply); a TCP reset sends
1011; a WebSocket close or loss closes the TCP side after it has flushed.

The autobahn protocols of both directions mix in :class:`BridgeWsMixin`; the
TCP protocols are :class:`BridgeTcpProtocol`.  :func:`apply_limits` sets every
autobahn factory's limits from the ``[[stream.server]]`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config.model import StreamServer
from ..relay import A, B, Splice

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_HANDSHAKE",
    "Bridge",
    "BridgeTcpProtocol",
    "BridgeWsMixin",
    "ReactorTimer",
    "WsLeg",
    "apply_limits",
]

_log = Logger()

TCP, WS = A, B
MAX_HANDSHAKE = 16 * 1024  # bytes of HTTP head in an opening handshake
CLOSE_TIMEOUT = 5.0  # seconds for the peer to answer our close frame

OPEN = WebSocketProtocol.STATE_OPEN
CONNECTING = WebSocketProtocol.STATE_CONNECTING
CLOSED = WebSocketProtocol.STATE_CLOSED


class _Call:
    """autobahn cancels its timers without checking them: make that idempotent."""

    __slots__ = ("call",)

    def __init__(self, call: IDelayedCall) -> None:
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


class ReactorTimer:
    """autobahn's ``factory._batched_timer`` seam, on the injected clock (not txaio's global loop)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _Call:
        return _Call(self.clock.callLater(delay, fn, *args, **kwargs))


def apply_limits(factory: Any, cfg: StreamServer, clock: IReactorTime) -> None:
    """Set size limits, pings and timeouts on an autobahn factory (its defaults are unlimited)."""
    opts: dict[str, Any] = {
        "maxFramePayloadSize": cfg.max_message_size,
        "maxMessagePayloadSize": cfg.max_message_size,
        "autoFragmentSize": 0,
        "autoPingInterval": cfg.ping_interval,
        "autoPingTimeout": cfg.ping_timeout,
        "autoPingRestartOnAnyTraffic": True,
        "openHandshakeTimeout": cfg.open_handshake_timeout,
        "closeHandshakeTimeout": CLOSE_TIMEOUT,
        "failByDrop": False,  # fail with a close frame (1009, 1002, 1007), not a bare drop
        "utf8validateIncoming": True,
        "tcpNoDelay": True,
    }
    if factory.isServer:
        opts.update(webStatus=False, perMessageCompressionAccept=lambda _offers: None)
    else:
        opts.update(serverConnectionDropTimeout=CLOSE_TIMEOUT, perMessageCompressionOffers=[])
    factory.setProtocolOptions(**opts)
    factory._batched_timer = ReactorTimer(clock)
    factory.noisy = False


class WsLeg:
    """A WebSocket connection seen by the splice as a transport."""

    def __init__(self, proto: Any, max_message: int) -> None:
        self.proto = proto
        self.max_message = max_message
        self.close_code = (1000, "peer closed")

    # -- writing -------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        p = self.proto
        if p.state != OPEN:
            return  # closing: the peer said it reads no more
        n = self.max_message
        if 0 < n < len(data):
            for i in range(0, len(data), n):
                p.sendMessage(data[i : i + n], isBinary=True)
        else:
            p.sendMessage(data, isBinary=True)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseWriteConnection(self) -> None:
        """TCP sent EOF: WebSocket has no half-close, so close (1000) and let the peer finish."""
        self._close(1000, "tcp side closed")

    def loseConnection(self) -> None:
        self._close(*self.close_code)

    def abortConnection(self) -> None:
        self.proto.dropConnection(abort=True)

    def _close(self, code: int, reason: str) -> None:
        p = self.proto
        if p.state == OPEN:
            if code == 1000 or 3000 <= code <= 4999:
                p.sendClose(code, reason)
            else:  # 1001 / 1011 are ours to send too, but sendClose only takes 1000 and 3000-4999
                p.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        elif p.state == CONNECTING:
            p.dropConnection(abort=False)

    # -- producer / consumer ----------------------------------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.proto.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        transport = self.proto.transport
        if transport is not None:
            transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.proto.pause_reading()

    def resumeProducing(self) -> None:
        self.proto.resume_reading()

    def stopProducing(self) -> None:
        self.abortConnection()

    def getPeer(self) -> Any:
        return self.proto.transport.getPeer()

    def getHost(self) -> Any:
        return self.proto.transport.getHost()


class Bridge:
    """One TCP connection joined to one WebSocket connection (either may come first)."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float | None,
        max_message: int,
        on_done: Callable[[Bridge], None] | None = None,
    ) -> None:
        self.max_message = max_message
        self.on_done = on_done
        self.splice = Splice(clock, idle_timeout, on_done=self._finished)
        self.tcp: Any = None
        self.ws: WsLeg | None = None
        self.ws_proto: Any = None  # the WebSocket protocol, from its connectionMade (maybe not open yet)
        self.tcp_gone = False
        self.finished = False

    # -- the TCP side ------------------------------------------------------------------
    def tcp_made(self, transport: Any) -> None:
        """The TCP connection is up: the splice holds it paused until the WebSocket is open."""
        self.tcp = transport
        self.splice.attach(TCP, transport)

    def tcp_data(self, data: bytes) -> None:
        self.splice.received(TCP, data)

    def tcp_read_closed(self) -> None:
        self.splice.read_closed(TCP)

    def tcp_lost(self, reason: Failure | None) -> None:
        self.tcp_gone = True
        if self.ws is not None and reason is not None and not reason.check(ConnectionDone):
            self.ws.close_code = (1011, "tcp connection lost")
        self.splice.lost(TCP, reason)

    # -- the WebSocket side ------------------------------------------------------------------
    def ws_made(self, proto: Any) -> None:
        """The WebSocket's TCP connection is up (the opening handshake is not done yet)."""
        self.ws_proto = proto
        if self.finished:
            proto.dropConnection(abort=True)

    def ws_open(self, proto: Any) -> None:
        self.ws_proto = proto
        proto.bridge = self
        if self.finished or self.tcp_gone:
            proto.sendClose(1000, "tcp side closed")
            return
        self.ws = WsLeg(proto, self.max_message)
        self.splice.attach(WS, self.ws)

    def ws_data(self, payload: bytes) -> None:
        self.splice.received(WS, payload)

    def ws_closed(self, reason: Failure | None = None) -> None:
        self.splice.lost(WS, reason)

    # -- both -------------------------------------------------------------------------------
    def _finished(self, _splice: Splice) -> None:
        if self.finished:
            return
        self.finished = True
        p = self.ws_proto
        if p is not None and self.ws is None and p.state != CLOSED:
            p.dropConnection(abort=True)  # the TCP side went away during the opening handshake
        if self.on_done is not None:
            self.on_done(self)


@implementer(IHalfCloseableProtocol)
class BridgeTcpProtocol(Protocol):
    """The TCP side of a bridge (the accepted client of tcp2ws, the upstream of ws2tcp)."""

    transport: ITCPTransport  # set by makeConnection, before any event

    def __init__(self, bridge: Bridge, preamble: bytes = b"") -> None:
        self.bridge = bridge
        self.preamble = preamble

    def connectionMade(self) -> None:
        if self.preamble:
            self.transport.write(self.preamble)
        self.bridge.tcp_made(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bridge.tcp_data(data)

    def readConnectionLost(self) -> None:
        self.bridge.tcp_read_closed()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.bridge.tcp_lost(reason)


class BridgeWsMixin:
    """Mixed into autobahn's client and server protocols: frames to the bridge, limits, pauses.

    Expects ``self.bridge`` to be set before the handshake completes.
    """

    bridge: Bridge | None = None
    _reading_paused = False
    _ping_expired = False
    _opened = False
    _hold_input = False  # the server is deciding the handshake (connecting upstream)

    # attributes of autobahn's protocol, for the type checker
    state: int
    data: bytes
    transport: Any
    factory: Any
    failedByMe: bool
    autoPingTimeout: float
    autoPingTimeoutCall: Any
    autoPingPending: Any
    frame_data: Any
    message_data: Any

    def dataReceived(self, data: bytes) -> None:
        # too much before the handshake is done: a head with no end in sight, or (while the
        # server decides) early frames; bytes after a complete head are the peer's first frames
        if (self.state == CONNECTING and len(self.data) + len(data) > MAX_HANDSHAKE
                and (self._hold_input or (self.data + data).find(b"\r\n\r\n", 0, MAX_HANDSHAKE) < 0)):
            self._handshake_too_large()
            return
        if self.state == CONNECTING and self._hold_input:
            self.data += data  # consumed once the handshake is answered
            return
        self._dataReceived(data)  # type: ignore[attr-defined]  # (autobahn's dataReceived only adds a debug log)

    def _handshake_too_large(self) -> None:
        _log.info("websocket: opening handshake over {n} bytes: closed", n=MAX_HANDSHAKE)
        self.dropConnection(abort=True)  # type: ignore[attr-defined]

    # -- frames straight through (no whole-message assembly) -----------------------------------
    def onOpen(self) -> None:
        self._opened = True
        assert self.bridge is not None
        self.bridge.ws_open(self)

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self.failedByMe and self.bridge is not None and payload:
            self.bridge.ws_data(payload)

    def onMessageFrameEnd(self) -> None:
        self.frame_data = None

    def onMessageEnd(self) -> None:
        self.message_data = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self._opened:
            _log.info("websocket: closed during the opening handshake: {reason}", reason=reason)
        if self.bridge is not None:
            self.bridge.ws_closed()

    # -- reading paused by back-pressure ----------------------------------------------------------
    def pause_reading(self) -> None:
        self._reading_paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None:
            self.transport.resumeProducing()
        if self._ping_expired:
            self._ping_expired = False
            if self.autoPingTimeout and self.autoPingPending is not None and self.state == OPEN:
                self.autoPingTimeoutCall = self.factory._batched_timer.call_later(
                    self.autoPingTimeout, self.onAutoPingTimeout)

    def onAutoPingTimeout(self) -> None:
        if self._reading_paused:
            # the pong may be sitting unread in the socket: judge the peer once we read again
            self.autoPingTimeoutCall = None
            self._ping_expired = True
            return
        super().onAutoPingTimeout()  # type: ignore[misc]
