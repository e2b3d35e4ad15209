"""``limit_req_zone ... shared``: one leaky bucket per key for the whole fleet.

:class:`SharedRequestZone` is a :class:`~wmproxy_tw.limits.RequestZone`
whose :meth:`~SharedRequestZone.decide` asks Redis: the same state (``excess``
and the time it was updated) and the same arithmetic as the local zone, in
one atomic Lua script per request (:data:`LEAKY_BUCKET`, one round trip by
``EVALSHA``).  Time is Redis's (``TIME``), so the nodes' clocks don't matter.
Each key ``PREFIX lr:ZONE:KEY`` expires once its bucket has drained.

When Redis can't answer (not connected, lost, too slow), ``fail_open = true``
lets the local zone (the inherited state) decide — per-node limits — and
``fail_open = false`` refuses with 503; the manager logs the outage once.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config.model import LimitReqZone
from ..limits import Decision, RequestZone
from .redis import RedisUnavailable, Script

__all__ = ["LEAKY_BUCKET", "SharedRequestZone"]

_log = Logger()

#: KEYS: the key's state.  ARGV: rate (requests per second), burst, nodelay ("1"/"0").
#: Returns {1, delay_ms} (pass, after delay_ms) or {0, ms until a request would pass}.
LEAKY_BUCKET = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local excess = 0
local state = redis.call('GET', KEYS[1])
if state then
  local sep = string.find(state, ' ', 1, true)
  local elapsed = now - tonumber(string.sub(state, sep + 1))
  if elapsed < 0 then elapsed = 0 end
  excess = tonumber(string.sub(state, 1, sep - 1)) - rate * elapsed / 1000 + 1
  if excess < 0 then excess = 0 end
end
if excess > burst then
  return {0, math.ceil((excess - burst) / rate * 1000)}
end
redis.call('SET', KEYS[1], string.format('%.6f %.3f', excess, now), 'PX', math.ceil((excess + 1) / rate * 1000) + 1000)
if ARGV[3] == '1' or excess == 0 then return {1, 0} end
return {1, math.ceil(excess / rate * 1000)}
""")


class SharedRequestZone(RequestZone):
    """A zone decided in Redis through ``fleet`` (a :class:`~wmproxy_tw.fleet.FleetFeature`),
    falling back to this node's own bucket (the inherited :meth:`check`) when Redis can't."""

    def __init__(self, name: str, spec: LimitReqZone, clock: Any, fleet: Any) -> None:
        super().__init__(name, spec, clock)
        self.fleet = fleet
        self.shared_decisions = 0
        self.local_decisions = 0  # while Redis was unavailable
        self._complained = False

    def decide(self, key: str, burst: int = 0, nodelay: bool = False) -> Decision | Deferred[Decision]:
        redis = self.fleet.redis
        if not redis.available:
            return self._without_redis(key, burst, nodelay)
        d = redis.run(LEAKY_BUCKET, [self.fleet.key("lr", self.name, key)],
                      [repr(self.rate), burst, "1" if nodelay else "0"])
        return d.addCallbacks(self._decision, self._failed, errbackArgs=(key, burst, nodelay))

    def _decision(self, reply: Any) -> Decision:
        self.shared_decisions += 1
        self._complained = False
        allowed, ms = int(reply[0]), int(reply[1])
        if not allowed:
            self.refused += 1
            return Decision(False, retry_after=max(1, math.ceil(ms / 1000)))
        return Decision(True, delay=ms / 1000)

    def _failed(self, f: Failure, key: str, burst: int, nodelay: bool) -> Decision:
        if not f.check(RedisUnavailable) and not self._complained:
            self._complained = True  # once until Redis answers again
            _log.warn("fleet: shared limit_req zone {zone}: Redis refused the script ({e}); "  # noqa: G010
                      "deciding locally", zone=self.name, e=f.getErrorMessage())
        return self._without_redis(key, burst, nodelay)

    def _without_redis(self, key: str, burst: int, nodelay: bool) -> Decision:
        self.local_decisions += 1
        if self.fleet.settings.fail_open:
            return self.check(key, burst, nodelay)
        self.refused += 1
        return Decision(False, retry_after=1)
