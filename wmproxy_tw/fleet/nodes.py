"""The nodes' records in Redis (written by :class:`~wmproxy_tw.fleet.FleetFeature`, read by
``/status`` and ``wmproxy reload --fleet``).

Keys under ``key_prefix``: ``node:<node_id>`` a JSON record with a TTL of the
node's lease; ``nodes`` a sorted set of node ids scored by the end of their
lease (Redis server time, so node clocks don't matter).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from .redis import RedisManager, Script

__all__ = ["HEARTBEAT", "NODES", "live_nodes"]

#: KEYS: record, nodes set.  ARGV: node id, record JSON, lease (ms).  Returns the previous record.
HEARTBEAT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', lease)
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
return old
""")

#: KEYS: the nodes set.  ARGV: prefix of the record keys.  Returns the live records (JSON texts).
NODES = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then table.insert(out, v) end
end
return out
""")


def live_nodes(redis: RedisManager, prefix: str) -> defer.Deferred[list[dict[str, Any]]]:
    """The records of the nodes whose lease runs, sorted by node id."""

    def parse(texts: Any) -> list[dict[str, Any]]:
        out = []
        for t in texts or []:
            try:
                doc = json.loads(t)
            except (TypeError, ValueError):
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return sorted(out, key=lambda n: str(n.get("node_id")))

    return redis.run(NODES, [prefix + "nodes"], [prefix + "node:"]).addCallback(parse)
