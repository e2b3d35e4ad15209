"""limits: allow/deny, limit_req zones (leaky bucket, LRU bound, reload), rate_limit pacing."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from wmproxy_tw.config import load_text
from wmproxy_tw.config.grammar import parse_ipset, parse_rate
from wmproxy_tw.config.model import parse_limit_req_zone
from wmproxy_tw.limits import (
    PacedTransport,
    RequestZone,
    Throttle,
    TokenBucket,
    access_allowed,
    build_zones,
    connection_bucket,
)


def zone(spec: str = "{client_ip} limit=10m rate=10r/s", clock: Clock | None = None, **kw: Any) -> RequestZone:
    return RequestZone("z", parse_limit_req_zone(spec), clock or Clock(), **kw)


# ------------------------------------------------------------------ allow/deny

def test_access_allowed_v4_v6() -> None:
    """deny wins over allow; a non-empty allow list admits only members; v4 and v6 CIDRs."""
    allow = parse_ipset("10.0.0.0/8 ::1 2001:db8::/32")
    deny = parse_ipset("10.9.0.0/16")
    assert access_allowed("10.1.2.3", allow, deny)
    assert not access_allowed("10.9.1.1", allow, deny)
    assert not access_allowed("192.168.1.1", allow, deny)
    assert access_allowed("2001:db8::5", allow, deny)
    assert access_allowed("::1", allow, deny)
    assert not access_allowed("2001:db9::1", allow, deny)
    assert access_allowed("8.8.8.8", parse_ipset(""), parse_ipset(""))
    assert not access_allowed("8.8.8.8", None, parse_ipset("0.0.0.0/0"))
    assert access_allowed("::ffff:10.1.1.1", allow, None)  # v4-mapped clients match v4 rules


# ------------------------------------------------------------------ limit_req

def test_rate_10_burst_5_hundred_requests_in_one_second() -> None:
    """rate=10r/s burst=5: 100 evenly spaced requests in 1 s → about 15 pass, the rest 503."""
    clock = Clock()
    z = zone(clock=clock)
    passed = 0
    for _ in range(100):
        d = z.check("10.0.0.1", burst=5)
        passed += d.allowed
        if not d.allowed:
            assert d.status == 503 and d.retry_after >= 1
        clock.advance(0.01)
    assert 13 <= passed <= 17
    assert z.check("10.0.0.2", burst=5).allowed  # another client is unaffected


def test_burst_at_once_and_delays() -> None:
    """All at once: 1 + burst pass; without nodelay the k-th waits k/rate s; nodelay waits 0."""
    clock = Clock()
    z = zone(clock=clock)
    got = [z.check("a", burst=5) for _ in range(10)]
    assert [d.allowed for d in got] == [True] * 6 + [False] * 4
    assert [round(d.delay, 3) for d in got[:6]] == [0, 0.1, 0.2, 0.3, 0.4, 0.5]
    z2 = zone(clock=clock)
    assert all(d.delay == 0 for d in (z2.check("a", burst=5, nodelay=True) for _ in range(6)))


def test_refused_requests_do_not_count_and_retry_after() -> None:
    """A refused request leaves the bucket as it was; after Retry-After seconds one passes."""
    clock = Clock()
    z = zone("{client_ip} rate=1r/s", clock=clock)
    assert z.check("a").allowed
    refused = z.check("a")
    assert not refused.allowed and refused.retry_after == 1
    for _ in range(50):
        assert not z.check("a").allowed
    clock.advance(refused.retry_after)
    assert z.check("a").allowed


def test_idle_key_starts_fresh() -> None:
    """After the bucket drained, a key's next request has no delay."""
    clock = Clock()
    z = zone(clock=clock)
    for _ in range(4):
        z.check("a", burst=5)
    clock.advance(10)
    assert z.check("a", burst=5).delay == 0


def test_lru_bound_never_refuses_new_keys() -> None:
    """A full zone evicts its least recently seen key; a new key is always admitted."""
    clock = Clock()
    z = zone(clock=clock, max_entries=100)
    z.check("keep")
    for i in range(1000):
        assert z.check(f"k{i}").allowed
        if i % 10 == 0:
            z.check("keep")  # recently seen: survives
        clock.advance(0.001)
    assert len(z) == 100
    assert "keep" in z and "k0" not in z and "k999" in z
    assert z.evicted == 1000 + 1 - 100


def test_zone_memory_bound_from_limit() -> None:
    """``limit=1m`` bounds the zone at ~16 thousand keys (64 bytes each, as nginx says)."""
    assert zone("{client_ip} limit=1m rate=1r/s").max_entries == 16384
    assert zone("{client_ip} limit=1k rate=1r/s").max_entries == 16


def test_idle_entries_expire() -> None:
    """Keys idle for a minute with a drained bucket are dropped as new requests come."""
    clock = Clock()
    z = zone(clock=clock)
    z.check("old1")
    z.check("old2")
    clock.advance(61)
    z.check("new")
    assert len(z) == 1 and "new" in z


def test_reload_carries_state_by_name() -> None:
    """A reloaded zone of the same name keeps per-key state; a changed key template drops it."""
    clock = Clock()
    text = '[http.limit_req_zone]\nz = "{client_ip} limit=1m rate=1r/s"\n'
    old = build_zones(load_text(text, "a.toml").config.http.limit_req_zone, clock)
    assert old["z"].check("a").allowed and not old["z"].check("a").allowed
    new = build_zones(load_text(text.replace("1r/s", "2r/s"), "b.toml").config.http.limit_req_zone, clock, old)
    assert new["z"] is not old["z"] and not new["z"].check("a").allowed
    other = build_zones(load_text(text.replace("{client_ip}", "{host}"), "c.toml").config.http.limit_req_zone,
                        clock, old)
    assert other["z"].check("a").allowed


# ------------------------------------------------------------------ pacing

class PullSource:
    """A pull producer writing ``chunk`` bytes per resumeProducing, ``total`` in all."""

    def __init__(self, consumer: Any, chunk: int, total: int) -> None:
        self.consumer, self.chunk, self.left = consumer, chunk, total
        self.stopped = False

    def resumeProducing(self) -> None:
        n = min(self.chunk, self.left)
        self.left -= n
        self.consumer.write(b"x" * n)
        if not self.left:
            self.consumer.unregisterProducer()

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IPushProducer)
class PushSource:
    """A push producer writing ``chunk`` bytes every millisecond while not paused."""

    def __init__(self, clock: Clock, consumer: Any, chunk: int) -> None:
        self.clock, self.consumer, self.chunk = clock, consumer, chunk
        self.paused = False
        self.pauses = 0
        self.call: Any = clock.callLater(0.001, self.tick)

    def tick(self) -> None:
        if not self.paused:
            self.consumer.write(b"y" * self.chunk)
        self.call = self.clock.callLater(0.001, self.tick)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.call.cancel()


def run_for(clock: Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_bucket_debt_and_wait() -> None:
    """Spending past the tokens gives the wait until the debt is paid by the rate."""
    clock = Clock()
    b = TokenBucket(1000, clock, burst=100)
    assert b.spend(100) == 0
    assert b.spend(500) == pytest.approx(0.5)
    clock.advance(0.25)
    assert b.wait() == pytest.approx(0.25)
    clock.advance(10)
    assert b.wait() == 0 and b.tokens == 100  # refilled up to the burst, no further


def test_throttle_paces_pull_producer() -> None:
    """A pull producer through a Throttle at 100 KiB/s delivers ~500 KiB in 5 s, not everything."""
    clock = Clock()
    transport = StringTransport()
    rate = 100 * 1024
    t = Throttle(transport, TokenBucket(rate, clock), clock)
    verifyObject(IConsumer, t)
    src = PullSource(t, 8 * 1024, 10 * 1024 * 1024)
    t.registerProducer(src, False)
    run_for(clock, 5)
    sent = len(transport.value())
    assert 0.95 * 5 * rate <= sent <= 5 * rate + t.bucket.burst + 8 * 1024


def test_throttle_paces_push_producer_and_respects_consumer_pause() -> None:
    """A push producer is paused while in debt (~rate delivered); a consumer pause also holds it."""
    clock = Clock()
    transport = StringTransport()
    rate = 200 * 1024
    t = Throttle(transport, TokenBucket(rate, clock), clock)
    src = PushSource(clock, t, 4096)
    t.registerProducer(src, True)
    run_for(clock, 4)
    sent = len(transport.value())
    assert 0.9 * 4 * rate <= sent <= 4 * rate + t.bucket.burst + 4096
    assert src.pauses > 0
    gate = transport.producer
    gate.pauseProducing()  # the transport's buffer is full
    run_for(clock, 1)
    assert src.paused
    before = len(transport.value())
    run_for(clock, 1)
    assert len(transport.value()) == before
    gate.resumeProducing()
    run_for(clock, 1)
    assert len(transport.value()) > before
    t.unregisterProducer()
    assert transport.producer is None
    src.stopProducing()


def test_stop_from_consumer_reaches_producer() -> None:
    """stopProducing from the consumer (connection lost) stops the paced producer and timers."""
    clock = Clock()
    transport = StringTransport()
    t = Throttle(transport, TokenBucket(1024, clock, burst=1024), clock)
    src = PullSource(t, 4096, 100000)
    t.registerProducer(src, False)
    clock.advance(0)
    transport.producer.stopProducing()
    assert src.stopped and not clock.getDelayedCalls()


def test_paced_transport_keeps_transport_api() -> None:
    """PacedTransport paces writes but is otherwise the transport (peer, pause = stop reading)."""
    clock = Clock()
    transport = StringTransport()
    paced = PacedTransport(transport, TokenBucket(1000, clock, burst=1000), clock)
    assert paced.getPeer() == transport.getPeer()
    paced.pauseProducing()
    assert transport.producerState == "paused"
    paced.write(b"a" * 3000)
    assert transport.value() == b"a" * 3000
    assert paced.bucket.wait() == pytest.approx(2.0)


def test_connection_bucket_shared_per_connection() -> None:
    """Responses on one connection share a bucket (H2 streams their connection's); rate updates."""
    clock = Clock()

    class Chan:
        pass

    class Stream:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

    a, b = Chan(), Chan()
    rate = parse_rate("4m/s")
    assert connection_bucket(a, rate, clock) is connection_bucket(a, rate, clock)
    assert connection_bucket(a, rate, clock) is not connection_bucket(b, rate, clock)
    assert connection_bucket(Stream(a), rate, clock) is connection_bucket(a, rate, clock)
    assert connection_bucket(a, 1000.0, clock).rate == 1000.0


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    """At start-up the soft RLIMIT_NOFILE goes up to the hard one (65536 if unlimited); a refusal is
    a warning, never a failed start."""
    from wmproxy_tw.tap import raise_nofile_limit

    class FakeResource:
        RLIMIT_NOFILE, RLIM_INFINITY = 7, -1

        def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
            self.limits, self.refuse = (soft, hard), refuse

        def getrlimit(self, which: int) -> tuple[int, int]:
            return self.limits

        def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
            if self.refuse:
                raise ValueError("not allowed")
            self.limits = limits

    r = FakeResource(1024, 20000)
    assert raise_nofile_limit(r) == (1024, 20000) and r.limits == (20000, 20000)
    assert raise_nofile_limit(FakeResource(20000, 20000)) == (20000, 20000)
    r = FakeResource(1024, -1)
    assert raise_nofile_limit(r) == (1024, 65536) and r.limits == (65536, -1)
    assert raise_nofile_limit(FakeResource(1024, 4096, refuse=True)) == (1024, 1024)
