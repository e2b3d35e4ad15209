"""Connect to one member of an upstream group, trying the next on failure.

The L4 features (stream TCP, tcp2ws, ws2tcp) all open their upstream the same
way: select a member, count the connection, connect with the one connector
(:func:`wmproxy_tw.connect.connect`), report the outcome to passive health,
and on a connect failure try the next usable member.  The caller owns the
connection afterwards and must call ``group.connection_finished(member)``
once when it ends (:meth:`Dialed.release` does it exactly once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from ..connect import TargetPolicy, UpstreamError, connect
from .interfaces import IUpstreamSelector
from .selector import Member

__all__ = ["ClientDial", "Dialed", "dial"]


@dataclass
class Dialed:
    """An open upstream connection and the member it went to."""

    group: Any  # IUpstreamSelector
    member: Member
    protocol: Protocol
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """The connection is over: un-count it (idempotent)."""
        if not self._released:
            self._released = True
            self.group.connection_finished(self.member)

    def close(self) -> None:
        """Nobody wants the connection any more (its client left): close it, release the member."""
        transport = self.protocol.transport
        if transport is not None:
            transport.loseConnection()
        self.release()


def dial(
    reactor: Any,
    group: IUpstreamSelector,
    factory_for: Callable[[Member], IProtocolFactory],
    key: str | None = None,
    timeout: float = 10.0,
    policy: TargetPolicy | None = None,
) -> Deferred[Dialed]:
    """Connect to a member of ``group``; errback :class:`UpstreamError` if none can be reached.

    ``factory_for(member)`` builds the client factory for one attempt.  Each
    member is tried at most once.  Cancelling the Deferred cancels the attempt
    in flight (its member is un-counted, no health is reported).
    """
    tried: set[Member] = set()
    current: list[Any] = [None, None]  # [member, connect Deferred] of the attempt in flight

    def cancel(_d: Deferred[Dialed]) -> None:
        member, attempt = current
        current[0] = current[1] = None
        if member is not None:
            group.connection_finished(member)
        if attempt is not None:
            attempt.cancel()

    result: Deferred[Dialed] = Deferred(cancel)

    def attempt(last: UpstreamError | None) -> None:
        member = group.select(key, exclude=frozenset(tried))
        if member is None:
            if last is None:
                last = UpstreamError(502, f"no usable member in upstream {group.name!r}")
            result.errback(Failure(last))
            return
        tried.add(member)
        group.connection_started(member)
        host, port = member.addr
        d = connect(reactor, host, port, factory_for(member), timeout=timeout, policy=policy)
        current[0], current[1] = member, d

        def ok(proto: Protocol) -> None:
            if current[1] is not d:
                return
            current[0] = current[1] = None
            group.report_success(member)
            result.callback(Dialed(group, member, proto))

        def failed(f: Failure) -> None:
            if current[1] is not d or f.check(CancelledError):
                return
            current[0] = current[1] = None
            group.report_failure(member)
            group.connection_finished(member)
            err = UpstreamError.of(f)
            attempt(err)

        d.addCallbacks(ok, failed)

    attempt(None)
    return result


class ClientDial:
    """The upstream dial of one accepted client (stream TCP, tcp2ws): the attempt, then the connection.

    ``failed(err)`` hears an unreachable upstream (never a cancelled attempt); a
    connection made after ``gone()`` says the client left is closed at once.  The
    client calls :meth:`cancel` when it leaves and :meth:`release` when its relay ends.
    """

    def __init__(
        self,
        reactor: Any,
        group: IUpstreamSelector,
        factory_for: Callable[[Member], IProtocolFactory],
        *,
        key: str | None,
        timeout: float,
        gone: Callable[[], bool],
        failed: Callable[[UpstreamError], None],
    ) -> None:
        self._gone = gone
        self._on_failed = failed
        self.dialed: Dialed | None = None
        self.dialing: Deferred[Dialed] | None = dial(reactor, group, factory_for, key=key, timeout=timeout)
        self.dialing.addCallbacks(self._connected, self._failed)

    def _connected(self, dialed: Dialed) -> None:
        self.dialing = None
        self.dialed = dialed
        if self._gone():
            dialed.close()

    def _failed(self, f: Failure) -> None:
        self.dialing = None
        if not f.check(CancelledError):
            self._on_failed(UpstreamError.of(f))

    def cancel(self) -> None:
        """The client left while dialing: give up the attempt (no failure is reported)."""
        if self.dialing is not None:
            d, self.dialing = self.dialing, None
            d.cancel()

    def release(self) -> None:
        """The relay is over: un-count the connection (idempotent)."""
        if self.dialed is not None:
            self.dialed.release()
