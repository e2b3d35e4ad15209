"""SharedRequestZone without Redis: decisions from the script's reply, fallbacks, the limit_req step."""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from wmproxy_tw.config.model import LimitReq, parse_limit_req_zone
from wmproxy_tw.fleet.limits import LEAKY_BUCKET, SharedRequestZone
from wmproxy_tw.fleet.redis import RedisUnavailable
from wmproxy_tw.limits import LimitReqStep


class FakeRedis:
    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.calls: list[tuple[Any, ...]] = []
        self.reply: Any = [1, 0]

    def run(self, script: Any, keys: Any, args: Any) -> defer.Deferred[Any]:
        self.calls.append((script, list(keys), list(args)))
        if isinstance(self.reply, Exception):
            return defer.fail(self.reply)
        return defer.succeed(self.reply)


class FakeFleet:
    def __init__(self, redis: FakeRedis, fail_open: bool = True) -> None:
        self.redis = redis
        self.settings = type("S", (), {"fail_open": fail_open})()

    def key(self, *parts: str) -> str:
        return "p:" + ":".join(parts)


def _zone(redis: FakeRedis, fail_open: bool = True) -> SharedRequestZone:
    return SharedRequestZone("z", parse_limit_req_zone("{client_ip} rate=10r/s shared"), Clock(),
                             FakeFleet(redis, fail_open))


def _result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_one_script_call_per_request() -> None:
    """Each decision is one EVALSHA of the leaky-bucket script on PREFIX lr:ZONE:KEY with rate, burst, nodelay."""
    redis = FakeRedis()
    zone = _zone(redis)
    assert _result(zone.decide("1.2.3.4", 5, True)).allowed
    assert redis.calls == [(LEAKY_BUCKET, ["p:lr:z:1.2.3.4"], ["10.0", 5, "1"])]


def test_reply_becomes_a_decision() -> None:
    """{1, ms} passes after ms (a delay without nodelay); {0, ms} refuses with Retry-After in whole seconds."""
    redis = FakeRedis()
    zone = _zone(redis)
    redis.reply = [1, 250]
    d = _result(zone.decide("k"))
    assert d.allowed and d.delay == 0.25
    redis.reply = [0, 1500]
    d = _result(zone.decide("k"))
    assert not d.allowed and d.retry_after == 2 and zone.refused == 1
    assert zone.shared_decisions == 2


def test_unavailable_fail_open_decides_locally() -> None:
    """Redis down + fail_open: the node's own bucket decides (1 passes, the next at once is refused)."""
    zone = _zone(FakeRedis(available=False))
    assert zone.decide("k").allowed and not zone.decide("k").allowed
    assert zone.local_decisions == 2


def test_unavailable_fail_closed_refuses() -> None:
    """Redis down + fail_open = false: 503 with Retry-After 1."""
    d = _zone(FakeRedis(available=False), fail_open=False).decide("k")
    assert not d.allowed and d.retry_after == 1


def test_lost_mid_request_and_redis_errors_fall_back(no_logged_errors: list[Any]) -> None:
    """A connection lost during the call, or an error reply, is decided locally too (never a 500)."""
    redis = FakeRedis()
    zone = _zone(redis)
    redis.reply = RedisUnavailable("gone")
    assert _result(zone.decide("k")).allowed
    redis.reply = txredisapi.ResponseError("OOM command not allowed")
    assert not _result(zone.decide("k")).allowed  # local bucket: second request at once
    assert zone.local_decisions == 2


def test_limit_req_step_waits_for_the_shared_decision() -> None:
    """The pipeline step returns a Deferred; a refusal answers 503 with Retry-After."""
    redis = FakeRedis()
    zone = _zone(redis)
    step = LimitReqStep(zone, LimitReq("z", 0, False), lambda r: "k", Clock())
    redis.reply = [1, 0]
    assert _result(step.check(DummyRequest([b""]))) is True
    redis.reply = [0, 3000]
    req = DummyRequest([b""])
    assert _result(step.check(req)) is False
    assert req.responseCode == 503 and req.responseHeaders.getRawHeaders(b"retry-after") == [b"3"]
