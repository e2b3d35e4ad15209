"""Active health checks of an upstream group.

:class:`HealthChecker` runs a probe against every member each ``interval``
(a ``LoopingCall`` on the injected clock), bounds each probe by ``timeout``
and feeds the results to :meth:`UpstreamGroup.report_check`, which applies
the ``fall`` / ``rise`` streaks. A member whose previous probe is still in
flight is skipped, so one slow member never delays the others.

Probes are plain callables ``probe(member, spec) -> Deferred[bool]``; an
errback counts as a failure. :func:`tcp_probe` and :func:`http_probe` build
the real ones from an injected reactor.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wmproxy_tw.balance.interfaces import IHealthChecker
from wmproxy_tw.balance.model import HealthCheckSpec
from wmproxy_tw.balance.selector import Member, UpstreamGroup

log = Logger()

ProbeFn = Callable[[Member, HealthCheckSpec], "Deferred[bool]"]

MAX_RESPONSE_HEAD = 64 * 1024
"""The HTTP probe gives up when no final status line arrives within this many bytes."""


@implementer(IHealthChecker)
class HealthChecker(Service):
    """Probes every member of ``group`` periodically; a service (start/stop)."""

    def __init__(
        self,
        group: UpstreamGroup,
        clock: IReactorTime,
        probe: ProbeFn,
        spec: HealthCheckSpec | None = None,
    ) -> None:
        spec = spec if spec is not None else group.spec.health_check
        if spec is None:
            raise ValueError(f"upstream {group.name!r} has no health_check")
        self.group = group
        self.spec = spec
        self._clock = clock
        self._probe = probe
        self._loop: LoopingCall | None = None
        self._inflight: dict[Member, Deferred[bool]] = {}

    def start(self) -> None:
        self.startService()

    def stop(self) -> None:
        self.stopService()

    def startService(self) -> None:
        if self.running:
            return
        super().startService()
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self.spec.interval, now=True).addErrback(
            lambda f: log.failure(
                "health check loop of {group} died", f, group=self.group.name
            )
        )

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        inflight = list(self._inflight.values())
        self._inflight.clear()
        for d in inflight:
            d.cancel()

    def _tick(self) -> None:
        for member in self.group.members:
            if member.spec.down or member in self._inflight:
                continue
            self._check(member)

    def _check(self, member: Member) -> None:
        d: Deferred[bool] = maybeDeferred(self._probe, member, self.spec)
        self._inflight[member] = d
        d.addTimeout(self.spec.timeout, self._clock)
        d.addCallbacks(
            self._probed,
            self._probe_failed,
            callbackArgs=(member, d),
            errbackArgs=(member, d),
        )
        d.addErrback(
            lambda f: log.failure(
                "recording a health check of {member}", f, member=member.addr_str
            )
        )

    def _probed(self, ok: object, member: Member, d: Deferred[bool]) -> None:
        self._record(member, ok is True, d)

    def _probe_failed(self, reason: Failure, member: Member, d: Deferred[bool]) -> None:
        if self._inflight.get(member) is d:
            log.debug(
                "health check of {member} failed: {why}",
                member=member.addr_str,
                why=reason.getErrorMessage() or reason.type.__name__,
            )
        self._record(member, False, d)

    def _record(self, member: Member, ok: bool, d: Deferred[bool]) -> None:
        if self._inflight.get(member) is not d:
            return  # cancelled by stop()
        del self._inflight[member]
        self.group.report_check(member, ok, fall=self.spec.fall, rise=self.spec.rise)


# -- real probes -----------------------------------------------------------------


def tcp_probe(reactor: IReactorTCP) -> ProbeFn:
    """A probe that succeeds when a TCP connection to the member opens."""

    def probe(member: Member, spec: HealthCheckSpec) -> Deferred[bool]:
        host, port = member.addr
        endpoint = HostnameEndpoint(reactor, host, port, timeout=spec.timeout)
        d = connectProtocol(endpoint, Protocol())

        def connected(proto: Protocol) -> bool:
            if proto.transport is not None:
                proto.transport.loseConnection()
            return True

        return d.addCallback(connected)

    return probe


def http_probe(reactor: IReactorTCP, tls: Any = None) -> ProbeFn:
    """A probe that sends ``GET spec.path`` and matches the status with ``spec.expect``
    (over TLS when ``tls``, a client connection creator, is given: https upstreams)."""

    def probe(member: Member, spec: HealthCheckSpec) -> Deferred[bool]:
        host, port = member.addr
        proto = HTTPStatusProbe(build_request(member, spec.path or "/"))
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=spec.timeout)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda _proto: proto.done)
        d.addCallback(spec.accepts)
        return d

    return probe


def probe_for(reactor: IReactorTCP, spec: HealthCheckSpec, tls: Any = None) -> ProbeFn:
    """The real probe matching ``spec.kind``."""
    return http_probe(reactor, tls) if spec.kind == "http" else tcp_probe(reactor)


def build_request(member: Member, path: str) -> bytes:
    """The probe's request: HTTP/1.1 ``GET`` with ``Connection: close``."""
    port = member.addr[1]
    authority = member.addr_str if port != 80 else member.addr_str.rsplit(":", 1)[0]
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        "User-Agent: wmproxy-tw-health-check\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-5]\d\d)(?: .*)?$")


def parse_status_line(line: bytes) -> int:
    """The status code of an HTTP/1.x status line (without its line ending)."""
    m = _STATUS_LINE.match(line)
    if m is None:
        raise ValueError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return int(m.group(1))


class ProbeError(Exception):
    """The upstream's answer to a health check was not usable HTTP."""


class HTTPStatusProbe(Protocol):
    """Writes one request and fires ``done`` with the final response status.

    Reads at most :data:`MAX_RESPONSE_HEAD` bytes; skips interim ``1xx``
    responses; closes the connection as soon as the status is known.
    Cancelling ``done`` aborts the connection.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: Deferred[int] = Deferred(self._cancel)
        self._buf = bytearray()
        self._pos = 0
        self._skipping_interim = False

    def _cancel(self, _d: Deferred[int]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = MAX_RESPONSE_HEAD - len(self._buf)
        self._buf += data[:room]
        while True:
            nl = self._buf.find(b"\n", self._pos)
            if nl < 0:
                break
            line = bytes(self._buf[self._pos : nl]).rstrip(b"\r")
            self._pos = nl + 1
            if self._skipping_interim:
                self._skipping_interim = line != b""
                continue
            try:
                status = parse_status_line(line)
            except ValueError as e:
                self._finish(Failure(ProbeError(str(e))))
                return
            if 100 <= status < 200 and status != 101:
                self._skipping_interim = True
                continue
            self._finish(status)
            return
        if len(self._buf) >= MAX_RESPONSE_HEAD:
            self._finish(Failure(ProbeError("no final status within 64 KiB")))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(
                Failure(ProbeError("connection closed before a status line"))
            )

    def _finish(self, outcome: int | Failure) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
        if isinstance(outcome, Failure):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)
