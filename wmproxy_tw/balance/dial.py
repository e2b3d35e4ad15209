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

__all__ = ["Dialed", "dial"]


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
            err = f.value if isinstance(f.value, UpstreamError) else UpstreamError(502, str(f.value))
            attempt(err)

        d.addCallbacks(ok, failed)

    attempt(None)
    return result
