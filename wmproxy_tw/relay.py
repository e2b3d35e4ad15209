"""The one relay: join two connections with back-pressure both ways.

A :class:`Splice` owns two *legs*.  Whatever protocol reads a leg's bytes (the
forward proxy after its handshake, a stream listener, a tunnel stream, a
WebSocket bridge) calls ``splice.received(side, data)``,
``splice.read_closed(side)`` and ``splice.lost(side)``; the splice writes to
the other leg.  Each transport is registered as the streaming producer of the
other, so a slow reader pauses the fast writer (no unbounded buffer).

A leg is anything with the ``ITransport`` write/loseConnection methods plus
``registerProducer``/``unregisterProducer`` and ``pauseProducing``/
``resumeProducing`` — Twisted TCP and TLS transports, and our own tunnel and
WebSocket adapters, all qualify.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["Splice", "SpliceProtocol", "A", "B"]

A, B = 0, 1
_log = Logger()

#: After asking a leg to close gracefully, abort it if it is still open then.
CLOSE_GRACE = 10.0
#: Bytes a leg may deliver before its partner is attached (it is paused meanwhile: one read, in practice).
MAX_EARLY = 1024 * 1024


class Splice:
    """Two legs joined: bytes from one are written to the other."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float | None = None,
        on_done: Optional[Callable[["Splice"], None]] = None,
        meter: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        #: ``meter(side, n)``: count bytes read from a leg (see observe.stats.Meter)
        self.meter = meter
        self.legs: list[Any] = [None, None]
        self.bytes = [0, 0]  # bytes read from leg A, from leg B
        self._read_closed = [False, False]
        self._lost = [False, False]
        self._last = clock.seconds()
        self._idle: IDelayedCall | None = None
        self._aborts: list[IDelayedCall | None] = [None, None]
        self._early = [b"", b""]  # read from a leg before the other was attached
        self._held = [False, False]  # legs we paused until their partner came
        self._done = False

    # -- set-up -------------------------------------------------------------
    def attach(self, side: int, transport: Any) -> None:
        """Give the splice its leg ``side``; when both are there, bytes flow.

        A leg attached alone is paused until its partner comes; what it
        delivered meanwhile (bounded by :data:`MAX_EARLY`) is written first.
        """
        self.legs[side] = transport
        if self.legs[1 - side] is None:
            transport.pauseProducing()
            self._held[side] = True
            return
        a, b = self.legs
        a.registerProducer(b, True)
        b.registerProducer(a, True)
        for s in (A, B):
            early, self._early[s] = self._early[s], b""
            if early and not self._lost[1 - s]:
                self.legs[1 - s].write(early)
        for s in (A, B):
            if self._held[s]:
                self._held[s] = False
                if not self._lost[s]:
                    self.legs[s].resumeProducing()
        if self.idle_timeout:
            self._idle = self.clock.callLater(self.idle_timeout, self._check_idle)

    @property
    def joined(self) -> bool:
        return self.legs[A] is not None and self.legs[B] is not None

    # -- events from the legs' protocols --------------------------------------
    def received(self, side: int, data: bytes) -> None:
        """Bytes read from ``side``: write them to the other leg."""
        self.bytes[side] += len(data)
        if self.meter is not None:
            self.meter(side, len(data))
        self._last = self.clock.seconds()
        other = self.legs[1 - side]
        if other is None:
            if len(self._early[side]) + len(data) > MAX_EARLY:
                _log.info("relay: over {n} bytes before the other side connected: aborting", n=MAX_EARLY)
                self.abort()
            else:
                self._early[side] += data
        elif not self._lost[1 - side]:
            other.write(data)

    def read_closed(self, side: int) -> None:
        """``side`` will send no more: half-close the other leg's write side."""
        if self._read_closed[side]:
            return
        self._read_closed[side] = True
        other = self.legs[1 - side]
        if other is None or self._lost[1 - side]:
            self._close(side)
            return
        if self._read_closed[1 - side]:
            self._close(A)
            self._close(B)
            return
        lose_write = getattr(other, "loseWriteConnection", None)
        if lose_write is not None:
            try:
                lose_write()
                return
            except (AttributeError, NotImplementedError):
                pass
        self._close(A)
        self._close(B)

    def lost(self, side: int, reason: Failure | None = None) -> None:
        """The leg ``side`` is gone: close the other after it has flushed."""
        if self._lost[side]:
            return
        self._lost[side] = True
        self._read_closed[side] = True
        call = self._aborts[side]
        if call is not None and call.active():
            call.cancel()
        other = self.legs[1 - side]
        if other is not None:
            try:
                other.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass
        if other is not None and not self._lost[1 - side]:
            self._close(1 - side)
        if all(self._lost) or other is None:
            self._finish()

    # -- closing ---------------------------------------------------------------
    def close(self) -> None:
        """Close both legs (gracefully, aborting after :data:`CLOSE_GRACE`)."""
        for side in (A, B):
            if self.legs[side] is not None and not self._lost[side]:
                self._close(side)
        if self.legs[A] is None or self.legs[B] is None:
            self._finish()

    def abort(self) -> None:
        """Abort both legs at once."""
        for side in (A, B):
            leg = self.legs[side]
            if leg is not None and not self._lost[side]:
                getattr(leg, "abortConnection", leg.loseConnection)()

    def _close(self, side: int) -> None:
        leg = self.legs[side]
        if leg is None or self._lost[side] or self._aborts[side] is not None:
            return
        leg.loseConnection()
        if not self._lost[side] and hasattr(leg, "abortConnection"):
            self._aborts[side] = self.clock.callLater(CLOSE_GRACE, leg.abortConnection)

    def _check_idle(self) -> None:
        self._idle = None
        if self._done:
            return
        assert self.idle_timeout
        left = self._last + self.idle_timeout - self.clock.seconds()
        if left > 0:
            self._idle = self.clock.callLater(left, self._check_idle)
            return
        _log.debug("relay idle for {t}s: closing", t=self.idle_timeout)
        self.close()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        for call in self._aborts:
            if call is not None and call.active():
                call.cancel()
        if self.on_done is not None:
            self.on_done(self)


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """A protocol whose only job is to be one leg of a :class:`Splice`.

    Used for the upstream side of every relay.  ``on_connected`` is called from
    ``connectionMade`` so the creator can attach it.
    """

    transport: Any

    def __init__(self, splice: Splice, side: int) -> None:
        self.splice = splice
        self.side = side

    def connectionMade(self) -> None:
        self.splice.attach(self.side, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.splice.received(self.side, data)

    def readConnectionLost(self) -> None:
        self.splice.read_closed(self.side)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.splice.lost(self.side, reason)
