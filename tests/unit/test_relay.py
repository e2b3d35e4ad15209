"""The one relay: bytes, producers, half-close, close grace and idle timeout, on fakes."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wmproxy_tw.relay import A, B, CLOSE_GRACE, Splice, SpliceProtocol


class Leg(StringTransport):
    """A StringTransport that records half-close and abort."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


def _pair(idle: float | None = None) -> tuple[Splice, Leg, Leg, Clock]:
    clock = Clock()
    s = Splice(clock, idle_timeout=idle)
    a, b = Leg(), Leg()
    s.attach(A, a)
    s.attach(B, b)
    return s, a, b, clock


def test_bytes_flow_both_ways_and_are_counted() -> None:
    """Bytes read from one leg are written to the other, and counted per direction."""
    s, a, b, _ = _pair()
    s.received(A, b"hello")
    s.received(B, b"world!")
    assert b.value() == b"hello" and a.value() == b"world!"
    assert s.bytes == [5, 6]


def test_each_leg_is_the_others_streaming_producer() -> None:
    """Back-pressure: A's transport produces for B and B's for A (streaming)."""
    _s, a, b, _ = _pair()
    assert a.producer is b and a.streaming
    assert b.producer is a and b.streaming


def test_half_close_propagates_then_both_close() -> None:
    """EOF from A half-closes B's write side; EOF from B too closes both."""
    s, a, b, _ = _pair()
    s.read_closed(A)
    assert b.write_closed and not a.disconnecting and not b.disconnecting
    s.received(B, b"late reply")
    assert a.value() == b"late reply"
    s.read_closed(B)
    assert a.disconnecting and b.disconnecting


def test_lost_leg_closes_other_and_aborts_after_grace() -> None:
    """When A is gone, B is closed gracefully, then aborted if still open after the grace."""
    done: list[Splice] = []
    clock = Clock()
    s = Splice(clock, on_done=done.append)
    a, b = Leg(), Leg()
    s.attach(A, a)
    s.attach(B, b)
    s.lost(A)
    assert b.disconnecting and not b.aborted
    clock.advance(CLOSE_GRACE)
    assert b.aborted
    s.lost(B)
    assert done == [s]
    assert not clock.getDelayedCalls()


def test_data_for_a_lost_leg_is_dropped() -> None:
    """Nothing is written to a leg after it was lost."""
    s, a, _b, _ = _pair()
    s.lost(A)
    s.received(B, b"x")
    assert a.value() == b""


def test_idle_timeout_closes_both_legs() -> None:
    """No bytes for idle_timeout seconds closes the relay; traffic postpones it."""
    s, a, b, clock = _pair(idle=10)
    clock.advance(6)
    s.received(A, b"x")
    clock.advance(6)
    assert not a.disconnecting
    clock.advance(5)
    assert a.disconnecting and b.disconnecting


def test_splice_protocol_attaches_on_connect() -> None:
    """SpliceProtocol becomes leg B when connected and forwards its events."""
    clock = Clock()
    s = Splice(clock)
    a = Leg()
    s.attach(A, a)
    p = SpliceProtocol(s, B)
    b = Leg()
    p.makeConnection(b)
    assert s.joined
    p.dataReceived(b"up")
    assert a.value() == b"up"
    p.readConnectionLost()
    assert a.write_closed
