"""Unit tests of active health checks (wmproxy_tw.balance.health).

Checker logic runs on task.Clock with fake probe Deferreds; the real probes
are exercised against loopback servers on 127.0.0.1:0.
"""

from __future__ import annotations


import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from wmproxy_tw.balance import (
    GroupSpec,
    HealthChecker,
    HealthCheckSpec,
    IHealthChecker,
    Member,
    MemberSpec,
    UpstreamGroup,
    http_probe,
    probe_for,
    tcp_probe,
)
from wmproxy_tw.balance.health import (
    MAX_RESPONSE_HEAD,
    HTTPStatusProbe,
    ProbeError,
    build_request,
    parse_status_line,
)
from wmproxy_tw.balance.model import parse_expect
from wmproxy_tw.balance.testing import FakeHealthChecker

pytestmark = pytest.mark.timeout(5)


class FakeProbe:
    """A probe whose answers the test gives by firing the returned Deferreds."""

    def __init__(self) -> None:
        self.calls: list[tuple[Member, Deferred[bool]]] = []
        self.cancelled: list[Member] = []

    def __call__(self, member: Member, spec: HealthCheckSpec) -> Deferred[bool]:
        d: Deferred[bool] = Deferred(lambda _d: self.cancelled.append(member))
        self.calls.append((member, d))
        return d

    def count(self, member: Member) -> int:
        return sum(1 for m, _ in self.calls if m is member)

    def answer(self, member: Member, ok: bool) -> None:
        pending = [d for m, d in self.calls if m is member and not d.called]
        assert len(pending) == 1, f"{len(pending)} probes of {member} pending"
        pending[0].callback(ok)


def setup(
    *members: MemberSpec, **check: object
) -> tuple[UpstreamGroup, HealthChecker, FakeProbe, Clock]:
    clock = Clock()
    hc = HealthCheckSpec(**check)  # type: ignore[arg-type]
    group = UpstreamGroup(GroupSpec("g", members, health_check=hc), clock)
    probe = FakeProbe()
    return group, HealthChecker(group, clock, probe), probe, clock


def rounds(
    checker: HealthChecker, probe: FakeProbe, clock: Clock, m: Member, *oks: bool
) -> None:
    """Answer the pending probe of ``m`` with each result, one interval apart."""
    for ok in oks:
        probe.answer(m, ok)
        clock.advance(checker.spec.interval)


A = MemberSpec("10.0.0.1", 1)
B = MemberSpec("10.0.0.1", 2)


# -- the checker ------------------------------------------------------------------


def test_checker_and_double_provide_interface() -> None:
    """HealthChecker and FakeHealthChecker both provide IHealthChecker."""
    _, checker, _, _ = setup(A)
    assert verifyObject(IHealthChecker, checker)
    assert verifyObject(IHealthChecker, FakeHealthChecker())


def test_group_without_health_check_is_refused() -> None:
    """A checker for a group with no health_check and no explicit spec is a ValueError."""
    group = UpstreamGroup(GroupSpec("g", (A,)), Clock())
    with pytest.raises(ValueError, match="health_check"):
        HealthChecker(group, Clock(), FakeProbe())


def test_explicit_spec_overrides_group_spec() -> None:
    """An explicit spec (e.g. a TCP check for a stream group) wins over the group's."""
    group = UpstreamGroup(GroupSpec("g", (A,)), Clock())
    tcp = HealthCheckSpec(kind="tcp", path=None)
    assert HealthChecker(group, Clock(), FakeProbe(), spec=tcp).spec is tcp


def test_start_probes_every_member_at_once_then_each_interval() -> None:
    """start() probes all members immediately, then again every interval."""
    group, checker, probe, clock = setup(A, B, interval=2.0)
    a, b = group.members
    checker.start()
    assert (probe.count(a), probe.count(b)) == (1, 1)
    probe.answer(a, True)
    probe.answer(b, True)
    clock.advance(2)
    assert (probe.count(a), probe.count(b)) == (2, 2)
    checker.stop()


def test_fall_consecutive_failures_mark_member_unhealthy() -> None:
    """fall failed probes in a row make the member unusable for select()."""
    group, checker, probe, clock = setup(A, B, fall=3)
    a, b = group.members
    checker.start()
    probe.answer(b, True)
    rounds(checker, probe, clock, a, False, False)
    assert a.check_healthy
    probe.answer(a, False)
    assert not a.check_healthy
    assert {group.select() for _ in range(4)} == {b}
    checker.stop()


def test_a_success_resets_the_fall_streak() -> None:
    """Failures separated by a success never reach fall."""
    group, checker, probe, clock = setup(A, fall=3)
    (a,) = group.members
    checker.start()
    rounds(checker, probe, clock, a, False, False, True, False, False)
    assert a.check_healthy
    checker.stop()


def test_rise_consecutive_successes_restore_member() -> None:
    """After being marked unhealthy, rise good probes in a row make it usable again."""
    group, checker, probe, clock = setup(A, fall=1, rise=2)
    (a,) = group.members
    checker.start()
    rounds(checker, probe, clock, a, False)
    assert group.select() is None
    rounds(checker, probe, clock, a, True, False, True)
    assert group.select() is None
    rounds(checker, probe, clock, a, True)
    assert group.select() is a
    assert group.snapshot()["members"][0]["healthy"] is True
    checker.stop()


def test_probe_is_bounded_by_timeout() -> None:
    """A probe that never answers is cancelled after timeout and counts as a failure."""
    group, checker, probe, clock = setup(A, fall=1, timeout=1.0, interval=5.0)
    (a,) = group.members
    checker.start()
    clock.advance(0.99)
    assert a.check_healthy and probe.cancelled == []
    clock.advance(0.01)
    assert probe.cancelled == [a]
    assert not a.check_healthy
    checker.stop()


def test_slow_member_is_skipped_not_stacked() -> None:
    """While a member's probe is in flight it gets no second probe; others go on."""
    group, checker, probe, clock = setup(A, B, interval=1.0, timeout=5.0)
    a, b = group.members
    checker.start()
    for _ in range(3):
        probe.answer(b, True)
        clock.advance(1)
    assert probe.count(a) == 1
    assert probe.count(b) == 4
    checker.stop()


def test_down_members_are_not_probed() -> None:
    """Members configured down = true are never probed."""
    group, checker, probe, _ = setup(A, MemberSpec("10.0.0.1", 2, down=True))
    checker.start()
    assert [m for m, _ in probe.calls] == [group.members[0]]
    checker.stop()


def test_probe_raising_or_returning_non_true_is_a_failure() -> None:
    """A probe that raises, or answers anything but True, counts as a failed check."""
    clock = Clock()
    hc = HealthCheckSpec(fall=1)
    group = UpstreamGroup(GroupSpec("g", (A, B), health_check=hc), clock)
    a, b = group.members

    def probe(member: Member, spec: HealthCheckSpec) -> Deferred[bool]:
        if member is a:
            raise RuntimeError("boom")
        return Deferred.fromCoroutine(_answer("yes"))

    async def _answer(value: object) -> object:
        return value

    checker = HealthChecker(group, clock, probe)  # type: ignore[arg-type]
    checker.start()
    assert not a.check_healthy
    assert not b.check_healthy
    checker.stop()


def test_stop_cancels_probes_and_stops_the_loop() -> None:
    """stop() cancels in-flight probes without recording them and probes no more."""
    group, checker, probe, clock = setup(A, fall=1)
    (a,) = group.members
    checker.start()
    checker.stop()
    assert probe.cancelled == [a]
    assert a.check_healthy
    clock.advance(60)
    assert probe.count(a) == 1


def test_start_and_stop_are_idempotent_and_restartable() -> None:
    """Double start/stop are no-ops; a stopped checker can start again."""
    group, checker, probe, _ = setup(A)
    (a,) = group.members
    checker.start()
    checker.start()
    assert probe.count(a) == 1
    checker.stop()
    checker.stop()
    checker.start()
    assert probe.count(a) == 2
    checker.stop()


def test_checker_runs_as_a_child_service() -> None:
    """As a child of a MultiService the checker starts and stops with its parent."""
    group, checker, probe, _ = setup(A)
    parent = MultiService()
    checker.setServiceParent(parent)
    parent.startService()
    assert checker.running and probe.count(group.members[0]) == 1
    parent.stopService()
    assert not checker.running


# -- the spec -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expect", "status", "ok"),
    [
        ("2xx", 200, True),
        ("2xx", 299, True),
        ("2xx", 302, False),
        ("3xx", 301, True),
        ("200", 200, True),
        ("200", 204, False),
        ("200-399", 302, True),
        ("200-399", 404, False),
        ("2xx,3xx", 304, True),
        ("200 204", 204, True),
    ],
)
def test_expect_patterns(expect: str, status: int, ok: bool) -> None:
    """expect accepts classes (2xx), single codes (200), ranges (200-399) and lists."""
    assert HealthCheckSpec(expect=expect).accepts(status) is ok


@pytest.mark.parametrize("expect", ["", "2x", "600", "299-200", "ok", "2xx;3xx"])
def test_bad_expect_is_rejected(expect: str) -> None:
    """Malformed expect patterns raise ValueError at construction."""
    with pytest.raises(ValueError, match="expect"):
        HealthCheckSpec(expect=expect)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "health"},
        {"path": "/a b"},
        {"path": "/x\r\nEvil: 1"},
        {"path": None},
        {"kind": "udp"},
        {"interval": 0},
        {"timeout": -1},
        {"fall": 0},
        {"rise": 0},
    ],
)
def test_bad_health_check_specs_are_rejected(kwargs: dict) -> None:
    """Bad paths (no slash, spaces, CRLF), kinds, intervals and streaks raise ValueError."""
    with pytest.raises(ValueError):
        HealthCheckSpec(**kwargs)


def test_tcp_check_needs_no_path() -> None:
    """A tcp check is valid without a path."""
    assert HealthCheckSpec(kind="tcp", path=None).kind == "tcp"
    assert parse_expect("2xx") == ((200, 299),)


# -- the HTTP probe protocol, without sockets -------------------------------------------


def connected_probe() -> tuple[HTTPStatusProbe, StringTransport, list[object]]:
    proto = HTTPStatusProbe(b"GET / HTTP/1.1\r\n\r\n")
    transport = StringTransport()
    proto.makeConnection(transport)
    results: list[object] = []
    proto.done.addBoth(results.append)
    return proto, transport, results


def test_request_is_http11_get_with_connection_close() -> None:
    """The probe request is GET path HTTP/1.1 with Host and Connection: close."""
    m = Member(MemberSpec("10.0.0.5", 8080))
    req = build_request(m, "/health?full=1")
    assert req.startswith(b"GET /health?full=1 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\n")
    assert b"\r\nConnection: close\r\n" in req and req.endswith(b"\r\n\r\n")
    assert b"Host: [::1]:81\r\n" in build_request(Member(MemberSpec("::1", 81)), "/")
    assert b"Host: example.com\r\n" in build_request(
        Member(MemberSpec("example.com", 80)), "/"
    )


def test_probe_writes_request_on_connect() -> None:
    """The request bytes are written as soon as the connection is made."""
    _, transport, _ = connected_probe()
    assert transport.value() == b"GET / HTTP/1.1\r\n\r\n"


def test_status_parsed_when_fed_one_byte_at_a_time() -> None:
    """The status line is found however the bytes are split, then the probe closes."""
    proto, transport, results = connected_probe()
    for byte in b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n":
        proto.dataReceived(bytes([byte]))
    assert results == [204]
    assert transport.disconnecting


def test_interim_1xx_responses_are_skipped() -> None:
    """A 100 Continue head is skipped and the final status is reported."""
    proto, _, results = connected_probe()
    proto.dataReceived(b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\nHTTP/1.1 503 Busy\r\n")
    assert results == [503]


def test_status_line_without_reason_and_http10_are_accepted() -> None:
    """HTTP/1.0 and a missing reason phrase parse; HTTP/2 or garbage do not."""
    assert parse_status_line(b"HTTP/1.0 200") == 200
    assert parse_status_line(b"HTTP/1.1 404 Not Found") == 404
    for bad in (b"HTTP/2 200", b"SSH-2.0-OpenSSH", b"HTTP/1.1 99 x", b"HTTP/1.1 2000"):
        with pytest.raises(ValueError):
            parse_status_line(bad)


def test_garbage_answer_is_a_probe_error() -> None:
    """A non-HTTP answer fails the probe with ProbeError and closes."""
    proto, transport, results = connected_probe()
    proto.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert isinstance(results[0], Failure) and results[0].check(ProbeError)
    assert transport.disconnecting


def test_oversized_answer_without_status_is_a_probe_error() -> None:
    """No status line within 64 KiB fails the probe instead of buffering more."""
    proto, _, results = connected_probe()
    chunk = b"x" * 4096
    for _ in range(MAX_RESPONSE_HEAD // len(chunk) + 2):
        proto.dataReceived(chunk)
    assert len(results) == 1 and isinstance(results[0], Failure)
    assert results[0].check(ProbeError)


def test_connection_lost_before_status_is_a_probe_error() -> None:
    """A connection closed before any status line fails the probe."""
    proto, _, results = connected_probe()
    proto.dataReceived(b"HTTP/1.1 2")
    proto.connectionLost(Failure(ConnectionError()))
    assert isinstance(results[0], Failure) and results[0].check(ProbeError)


def test_cancelling_the_probe_aborts_the_connection() -> None:
    """Cancelling done (a timeout) aborts the transport."""
    proto, transport, results = connected_probe()
    proto.done.cancel()
    assert transport.disconnected
    assert isinstance(results[0], Failure) and results[0].check(CancelledError)


# -- real probes on loopback ------------------------------------------------------------


class CannedServer(Protocol):
    """Answers the first request head with a canned response, or stays silent."""

    factory: CannedFactory

    def connectionMade(self) -> None:
        self.buf = b""
        self.factory.connected.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.factory.on_data is not None:
            d, self.factory.on_data = self.factory.on_data, None
            d.callback(self)
        if b"\r\n\r\n" in self.buf and self.factory.response is not None:
            self.factory.requests.append(self.buf)
            self.transport.write(self.factory.response)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.factory.on_lost is not None:
            d, self.factory.on_lost = self.factory.on_lost, None
            d.callback(None)


class CannedFactory(Factory):
    protocol = CannedServer

    def __init__(self, response: bytes | None) -> None:
        self.response = response
        self.requests: list[bytes] = []
        self.connected: list[CannedServer] = []
        self.on_lost: Deferred[None] | None = Deferred()
        self.on_data: Deferred[CannedServer] | None = Deferred()


def listen(factory: Factory) -> tuple[object, int]:
    from twisted.internet import reactor

    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, port.getHost().port


def loopback_member(port: int) -> Member:
    return Member(MemberSpec("127.0.0.1", port))


@pytest_twisted.ensureDeferred
async def test_tcp_probe_succeeds_on_connect_and_closes() -> None:
    """tcp_probe answers True once connected, then closes its connection."""
    from twisted.internet import reactor

    factory = CannedFactory(None)
    port, number = listen(factory)
    try:
        spec = HealthCheckSpec(kind="tcp", path=None)
        assert await tcp_probe(reactor)(loopback_member(number), spec) is True
        await factory.on_lost
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tcp_probe_fails_on_refused_connection() -> None:
    """tcp_probe errbacks when nothing listens on the port."""
    from twisted.internet import reactor

    port, number = listen(Factory.forProtocol(Protocol))
    await port.stopListening()
    spec = HealthCheckSpec(kind="tcp", path=None)
    with pytest.raises(ConnectionRefusedError):
        await tcp_probe(reactor)(loopback_member(number), spec)


@pytest_twisted.ensureDeferred
async def test_http_probe_accepts_matching_status() -> None:
    """http_probe sends GET path with Connection: close and accepts a 2xx answer."""
    from twisted.internet import reactor

    factory = CannedFactory(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    port, number = listen(factory)
    try:
        spec = HealthCheckSpec(path="/healthz")
        assert await http_probe(reactor)(loopback_member(number), spec) is True
        (request,) = factory.requests
        assert request.startswith(b"GET /healthz HTTP/1.1\r\n")
        assert b"\r\nConnection: close\r\n" in request
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_probe_rejects_unexpected_status() -> None:
    """http_probe answers False for a 503 when 2xx is expected."""
    from twisted.internet import reactor

    factory = CannedFactory(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    port, number = listen(factory)
    try:
        result = await http_probe(reactor)(loopback_member(number), HealthCheckSpec())
        assert result is False
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_probe_cancel_closes_the_connection() -> None:
    """Cancelling an http_probe to a silent server fails it and drops the connection."""
    from twisted.internet import reactor

    factory = CannedFactory(None)
    port, number = listen(factory)
    try:
        d = http_probe(reactor)(loopback_member(number), HealthCheckSpec())
        await factory.on_data  # the request arrived: the probe awaits the status
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        await factory.on_lost
    finally:
        await port.stopListening()


def test_probe_for_picks_by_kind() -> None:
    """probe_for returns the http probe for kind http and the tcp probe for kind tcp."""
    reactor = object()
    http = probe_for(reactor, HealthCheckSpec())  # type: ignore[arg-type]
    tcp = probe_for(reactor, HealthCheckSpec(kind="tcp", path=None))  # type: ignore[arg-type]
    assert http.__qualname__.startswith("http_probe")
    assert tcp.__qualname__.startswith("tcp_probe")
