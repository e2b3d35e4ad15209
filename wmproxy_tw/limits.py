"""Limits shared by the features: IP access lists, request rate zones, bandwidth pacing.

* :func:`access_allowed` — ``allow_ip``/``deny_ip`` (the caller answers 403).
* :class:`RequestZone` — ``limit_req_zone``: nginx's leaky bucket per key
  (``burst``, ``nodelay``; ``shared`` zones are decided in Redis by
  :mod:`wmproxy_tw.fleet.limits`), memory bounded by the zone's ``limit`` with LRU
  eviction (a full zone forgets its least recently seen key, it never refuses
  everyone), state carried over a reload by zone name.  :meth:`RequestZone.check`
  returns a :class:`Decision`: pass now, pass after ``delay`` seconds, or 503
  with ``Retry-After``.
* :class:`TokenBucket`, :class:`Throttle`, :class:`PacedTransport` — ``rate_limit``:
  a consumer wrapper that paces whatever a producer writes through it (pausing
  the producer while the bucket is in debt), for HTTP responses and for relays.

Time only comes from the injected clock (``IReactorTime``).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from .config.grammar import IPSet, Rate
from .config.model import LimitReq, LimitReqZone

__all__ = [
    "Decision",
    "PacedTransport",
    "RequestZone",
    "Throttle",
    "TokenBucket",
    "access_allowed",
    "build_zones",
    "connection_bucket",
    "default_burst",
]


_log = Logger()

# ------------------------------------------------------------------ allow/deny

def access_allowed(ip: str, allow: IPSet | None, deny: IPSet | None) -> bool:
    """``deny_ip`` wins; a non-empty ``allow_ip`` admits only its members."""
    if deny and ip in deny:
        return False
    return not (allow and ip not in allow)


# ------------------------------------------------------------- limit_req zones

@dataclass(frozen=True)
class Decision:
    """The outcome of one request against a zone."""

    allowed: bool
    delay: float = 0.0  # seconds to hold the request before serving it (no ``nodelay``)
    retry_after: int = 0  # whole seconds, for the 503's Retry-After

    @property
    def status(self) -> int:
        return 200 if self.allowed else 503


#: Memory accounted per key, as nginx: "one megabyte keeps about 16 thousand 64-byte states".
ENTRY_BYTES = 64
#: Keys idle this long are dropped first (two at most per request, like nginx).
IDLE_EXPIRY = 60.0


class RequestZone:
    """One ``limit_req_zone``: a leaky bucket per key.

    Per key it keeps ``excess`` (requests above the rate, draining at ``rate``
    per second) and the time it was last updated.  A request raises excess by
    one; above ``burst`` it is refused (and does not count); otherwise it is
    served after ``excess / rate`` seconds, or at once with ``nodelay``.
    """

    def __init__(self, name: str, spec: LimitReqZone, clock: IReactorTime,
                 max_entries: int | None = None) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        self.rate = spec.rate.per_second
        self.max_entries = max_entries if max_entries is not None else max(16, spec.limit // ENTRY_BYTES)
        self._states: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.evicted = 0
        self.refused = 0

    @property
    def key_template(self) -> str:
        return self.spec.key

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def check(self, key: str, burst: int = 0, nodelay: bool = False) -> Decision:
        """Count one request for ``key`` (already expanded from the key template)."""
        now = self.clock.seconds()
        self._expire(now)
        state = self._states.get(key)
        if state is None:
            excess = 0.0
        else:
            old, last = state
            excess = max(0.0, old - self.rate * max(0.0, now - last) + 1.0)
            self._states.move_to_end(key)
        if excess > burst:
            self.refused += 1
            return Decision(False, retry_after=max(1, math.ceil((excess - burst) / self.rate)))
        self._states[key] = (excess, now)
        if state is None and len(self._states) > self.max_entries:
            self._states.popitem(last=False)
            self.evicted += 1
        delay = 0.0 if nodelay or excess == 0 else excess / self.rate
        return Decision(True, delay=delay)

    def decide(self, key: str, burst: int = 0, nodelay: bool = False) -> Decision | Deferred[Decision]:
        """What :class:`LimitReqStep` asks: here :meth:`check`; a shared zone
        (:class:`wmproxy_tw.fleet.limits.SharedRequestZone`) answers with a Deferred."""
        return self.check(key, burst, nodelay)

    def _expire(self, now: float) -> None:
        for _ in range(2):
            if not self._states:
                return
            key, (excess, last) = next(iter(self._states.items()))
            if now - last < IDLE_EXPIRY or excess - self.rate * (now - last) > 0:
                return
            del self._states[key]

    def carry_state_from(self, old: RequestZone) -> None:
        """Take the per-key state of the zone this one replaces on reload (same
        name).  Dropped if the key template changed (the keys mean something
        else); trimmed to this zone's bound, most recent keys kept."""
        if old.key_template != self.key_template:
            return
        items = list(old._states.items())[-self.max_entries:]
        self._states = OrderedDict(items)
        self.evicted, self.refused = old.evicted, old.refused


def build_zones(specs: Mapping[str, LimitReqZone], clock: IReactorTime,
                previous: Mapping[str, RequestZone] | None = None,
                shared: Callable[[str, LimitReqZone], RequestZone] | None = None) -> dict[str, RequestZone]:
    """The zones of ``http.limit_req_zone``; state carried over from ``previous`` by name.
    ``shared(name, spec)`` builds the zones marked ``shared`` (the fleet's)."""
    zones = {}
    for name, spec in specs.items():
        zone = shared(name, spec) if spec.shared and shared is not None else RequestZone(name, spec, clock)
        if previous is not None and name in previous:
            zone.carry_state_from(previous[name])
        zones[name] = zone
    return zones


class LimitReqStep:
    """``limit_req`` before the handler (the reverse pipeline's ``IStep``).

    ``key(request)`` expands the zone's key template for a request (the
    pipeline's templates over ``request.vars``).  ``check`` answers 503 with
    ``Retry-After`` and returns False, returns True, or — when nginx would
    delay the request (no ``nodelay``) — a Deferred firing True after the delay
    (False if the client left meanwhile).
    """

    def __init__(self, zone: RequestZone, rule: LimitReq, key: Callable[[Any], str],
                 clock: IReactorTime) -> None:
        self.zone = zone
        self.rule = rule
        self.key = key
        self.clock = clock

    def check(self, request: Any, ctx: Any = None) -> bool | Deferred[bool]:
        decision = self.zone.decide(self.key(request), self.rule.burst, self.rule.nodelay)
        if isinstance(decision, Deferred):  # a shared zone: Redis decides
            return decision.addCallback(self._apply, request)
        return self._apply(decision, request)

    def _apply(self, decision: Decision, request: Any) -> bool | Deferred[bool]:
        if getattr(request, "_disconnected", False):
            return False
        if not decision.allowed:
            _log.debug("limit_req zone {zone}: refused {key}", zone=self.zone.name, key=self.key(request))
            answer_503(request, decision.retry_after)
            return False
        if decision.delay > 0:
            return deferLater(self.clock, decision.delay, lambda: not getattr(request, "_disconnected", False))
        return True


def answer_503(request: Any, retry_after: int) -> None:
    """503 with ``Retry-After`` (whole seconds)."""
    body = b"503 Service Unavailable\n"
    request.setResponseCode(503)
    request.setHeader(b"retry-after", str(max(1, retry_after)).encode())
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


# ------------------------------------------------------------- bandwidth pacing

#: Shortest pause: clocks with large values can't represent tinier steps.
MIN_WAIT = 0.001


def default_burst(rate: float) -> float:
    """Bytes a fresh bucket may send at once: 1/8 s of the rate, within [4 KiB, 1 MiB]."""
    return min(max(rate / 8, 4096.0), 1024.0 * 1024)


class TokenBucket:
    """Bytes per second with a burst; spending may go into debt (then callers wait)."""

    def __init__(self, rate: float, clock: IReactorTime, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else default_burst(rate))
        self.tokens = self.burst
        self._stamp = clock.seconds()

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        self._refill()
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else default_burst(rate))
        self.tokens = min(self.tokens, self.burst)

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def spend(self, n: int) -> float:
        """Take ``n`` bytes; return the seconds to wait before sending more (0: none)."""
        self._refill()
        self.tokens -= n
        return self._debt()

    def wait(self) -> float:
        """Seconds until the debt is paid (0: none); never below :data:`MIN_WAIT`."""
        self._refill()
        return self._debt()

    def _debt(self) -> float:
        if self.tokens > -1.0:  # less than a byte of debt: float noise
            return 0.0
        return max(-self.tokens / self.rate, MIN_WAIT)

    @property
    def chunk(self) -> int:
        """A good write size for a producer paced by this bucket."""
        return int(min(64 * 1024, max(1024, self.rate / 8)))


@implementer(IPushProducer)
class _Gate:
    """What a :class:`Throttle` registers with its consumer (kept apart from the
    throttle so that a transport-like throttle keeps the transport's own
    pause/resume meaning)."""

    def __init__(self, throttle: Throttle) -> None:
        self.t = throttle

    def pauseProducing(self) -> None:
        self.t._consumer_paused(True)

    def resumeProducing(self) -> None:
        self.t._consumer_paused(False)

    def stopProducing(self) -> None:
        self.t._stop()


@implementer(IConsumer)
class Throttle:
    """A consumer that forwards writes to ``consumer`` at ``bucket``'s rate.

    Writes are never refused (``write`` can't); while the bucket is in debt the
    registered producer is paused (push) or not asked for more (pull) until the
    debt is paid.  The throttle registers itself with ``consumer`` as a push
    producer either way and drives a pull producer itself, one
    ``resumeProducing`` per reactor turn, so a throttled pull producer is never
    polled in a busy loop.  With no producer registered, writes pass and only
    the debt is recorded.
    """

    def __init__(self, consumer: Any, bucket: TokenBucket, clock: IReactorTime) -> None:
        self.consumer = consumer
        self.bucket = bucket
        self.clock = clock
        self.producer: Any = None
        self.streaming = True
        self._gate: _Gate | None = None
        self._throttled = False
        self._paused = False  # by the consumer
        self._timer: IDelayedCall | None = None
        self._pump_call: IDelayedCall | None = None

    @property
    def chunk(self) -> int:
        return self.bucket.chunk

    # IConsumer
    def write(self, data: bytes) -> None:
        self.consumer.write(data)
        self._account(len(data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        data = list(data)
        self.consumer.writeSequence(data)
        self._account(sum(len(d) for d in data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"producer {self.producer!r} already registered")
        self.producer, self.streaming = producer, bool(streaming)
        self._paused = self._throttled = False
        self._gate = _Gate(self)
        self.consumer.registerProducer(self._gate, True)
        wait = self.bucket.wait()
        if wait > 0:
            self._throttle(wait)
        elif not self.streaming:
            self._schedule_pump()

    def unregisterProducer(self) -> None:
        self._cancel()
        self.producer = None
        self._gate = None
        self._throttled = False
        self.consumer.unregisterProducer()

    # pacing
    def _account(self, n: int) -> None:
        wait = self.bucket.spend(n)
        if wait > 0 and self.producer is not None:
            self._throttle(wait)

    def _throttle(self, wait: float) -> None:
        if self._throttled:
            return
        self._throttled = True
        if self.streaming and not self._paused:
            self.producer.pauseProducing()
        self._timer = self.clock.callLater(wait, self._release)

    def _release(self) -> None:
        self._timer = None
        wait = self.bucket.wait()
        if wait > 0:
            self._timer = self.clock.callLater(wait, self._release)
            return
        self._throttled = False
        if self.producer is None or self._paused:
            return
        if self.streaming:
            self.producer.resumeProducing()
        else:
            self._schedule_pump()

    def _schedule_pump(self) -> None:
        if self._pump_call is None:
            self._pump_call = self.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        if self.producer is None or self._paused or self._throttled:
            return
        self.producer.resumeProducing()
        if self.producer is not None and not self._paused and not self._throttled:
            self._schedule_pump()

    def _consumer_paused(self, paused: bool) -> None:
        was, self._paused = self._paused, paused
        if self.producer is None or was == paused or self._throttled:
            return
        if not self.streaming:
            if not paused:
                self._schedule_pump()
        elif paused:
            self.producer.pauseProducing()
        else:
            self.producer.resumeProducing()

    def _stop(self) -> None:
        self._cancel()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()

    def _cancel(self) -> None:
        for call in (self._timer, self._pump_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._pump_call = None


class PacedTransport(Throttle):
    """A transport whose writes are paced; every other attribute is the transport's.

    For relays (:class:`wmproxy_tw.relay.Splice` legs): attach the paced
    transport instead of the real one and the relay's producer on it is paced.
    ``pauseProducing``/``resumeProducing`` still mean "stop/start reading" of the
    underlying transport.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


_buckets: weakref.WeakKeyDictionary[Any, TokenBucket] = weakref.WeakKeyDictionary()


def connection_bucket(connection: Any, rate: Rate | float, clock: IReactorTime) -> TokenBucket:
    """The bucket of one client connection (``rate_limit`` is per connection):
    every response on a keep-alive connection shares it.  For a twisted.web
    request pass ``request.channel``; HTTP/2 streams share their connection's."""
    per_second = rate.per_second if isinstance(rate, Rate) else float(rate)
    owner = getattr(connection, "_conn", connection)  # an H2Stream's H2Connection
    bucket = _buckets.get(owner)
    if bucket is None:
        bucket = _buckets[owner] = TokenBucket(per_second, clock)
    elif bucket.rate != per_second:
        bucket.set_rate(per_second)
    return bucket
