"""The fleet's tunnel directory: which nodes hold which tunnel client's domains and ports.

A node *claims* ``(mode, key)`` when one of its tunnel clients registers it (``key`` is a domain as
registered, lower case, possibly ``*.`` wildcard, for ``http``/``https``; ``""`` for the
``map_tcp_bind`` / ``map_proxy_bind`` default of ``tcp``/``proxy``), *renews* all its claims on
every fleet heartbeat and *releases* them when the client goes.  A claim is a lease: it lapses
``lease`` seconds after its last renewal, so the claims of a node that died vanish on their own.
:meth:`ITunnelDirectory.lookup` answers which live nodes hold the first of several keys (a
request's host, then its ``*.`` suffixes), with the inter-node address each advertised.

:class:`MemoryDirectory` keeps the table in a :class:`MemoryTable` shared by the nodes of a unit
test; :class:`RedisDirectory` keeps it in Redis through the fleet's connection manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from ..fleet.redis import Script

__all__ = ["Claim", "ITunnelDirectory", "MemoryDirectory", "MemoryTable", "RedisDirectory", "lookup_keys"]


@dataclass(frozen=True)
class Claim:
    """What one node says when it claims a key: its id and inter-node address."""

    node: str
    address: str  # the node's ``advertise`` ("host:port")


class ITunnelDirectory(Interface):
    """The fleet-wide table (mode, key) → claims, with leases."""

    node_id: str

    def claim(mode: str, key: str) -> Deferred[None]:
        """This node holds (mode, key) now (until released or its lease lapses)."""

    def release(mode: str, key: str) -> Deferred[None]:
        """This node no longer holds (mode, key)."""

    def renew() -> Deferred[None]:
        """Extend the lease of every claim of this node (re-creating any the store lost)."""

    def lookup(mode: str, keys: list[str]) -> Deferred[list[Claim]]:
        """The live claims of the first of ``keys`` that has any (empty: nobody holds any)."""

    def release_all() -> Deferred[None]:
        """Release every claim of this node (shutdown)."""


def lookup_keys(host: str) -> list[str]:
    """The directory keys a request for ``host`` matches, best first: exact, then ``*.`` suffixes."""
    labels = host.split(".")
    return [host] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]


@dataclass
class MemoryTable:
    """The shared store of :class:`MemoryDirectory` nodes: (mode, key) → {node: (claim, expiry)}."""

    entries: dict[tuple[str, str], dict[str, tuple[Claim, float]]] = field(default_factory=dict)


@implementer(ITunnelDirectory)
class MemoryDirectory:
    """An in-memory directory for tests: nodes of one process share a :class:`MemoryTable`."""

    def __init__(self, table: MemoryTable, node_id: str, address: str, clock: IReactorTime,
                 lease: float) -> None:
        self.table = table
        self.node_id = node_id
        self.me = Claim(node_id, address)
        self.clock = clock
        self.lease = lease
        self.held: set[tuple[str, str]] = set()

    def _put(self, mode: str, key: str) -> None:
        holders = self.table.entries.setdefault((mode, key), {})
        holders[self.node_id] = (self.me, self.clock.seconds() + self.lease)

    def claim(self, mode: str, key: str) -> Deferred[None]:
        self.held.add((mode, key))
        self._put(mode, key)
        return succeed(None)

    def release(self, mode: str, key: str) -> Deferred[None]:
        self.held.discard((mode, key))
        holders = self.table.entries.get((mode, key), {})
        holders.pop(self.node_id, None)
        if not holders:
            self.table.entries.pop((mode, key), None)
        return succeed(None)

    def renew(self) -> Deferred[None]:
        for mode, key in self.held:
            self._put(mode, key)
        return succeed(None)

    def lookup(self, mode: str, keys: list[str]) -> Deferred[list[Claim]]:
        now = self.clock.seconds()
        for key in keys:
            holders: dict[str, tuple[Any, float]] = self.table.entries.get((mode, key), {})
            live = [claim for claim, expiry in holders.values() if expiry > now]
            if live:
                return succeed(sorted(live, key=lambda c: c.node))
        return succeed([])

    def release_all(self) -> Deferred[None]:
        for mode, key in list(self.held):
            self.release(mode, key)
        return succeed(None)


# ------------------------------------------------------------------------------------ Redis
#
# Keys (under the fleet's key prefix, e.g. ``wmproxy:``):
#   tunnel:<mode>:<key>             a set of the node ids claiming (mode, key); TTL ≥ every claim's
#   tunnel:<mode>:<key>:node:<id>   that node's claim: its advertise address, TTL = lease
# A claim lapses with its key; lookups drop lapsed members from the set.

_CLAIM = """
local lease = tonumber(ARGV[3])
for _, idx in ipairs(KEYS) do
  redis.call('SET', idx .. ':node:' .. ARGV[1], ARGV[2], 'PX', lease)
  redis.call('SADD', idx, ARGV[1])
  if redis.call('PTTL', idx) < lease then redis.call('PEXPIRE', idx, lease) end
end
return #KEYS
"""
_RELEASE = """
for _, idx in ipairs(KEYS) do
  redis.call('DEL', idx .. ':node:' .. ARGV[1])
  redis.call('SREM', idx, ARGV[1])
end
return #KEYS
"""
_LOOKUP = """
for _, idx in ipairs(KEYS) do
  local live = {}
  for _, node in ipairs(redis.call('SMEMBERS', idx)) do
    local addr = redis.call('GET', idx .. ':node:' .. node)
    if addr then
      table.insert(live, node)
      table.insert(live, addr)
    else
      redis.call('SREM', idx, node)
    end
  end
  if #live > 0 then return live end
end
return {}
"""
RENEW_BATCH = 256
"""Claims renewed per script call (one round trip each)."""


@implementer(ITunnelDirectory)
class RedisDirectory:
    """The directory in Redis, through the fleet's one connection manager (``fleet.redis``).

    ``key(*parts)`` builds a key under the fleet's prefix; ``lease`` is in seconds.  Every
    operation is one script (``EVALSHA``) round trip; it fails with the manager's
    ``RedisUnavailable`` while Redis is down (the manager says so once per outage).  The claims
    this node holds are remembered, so :meth:`renew` after an outage re-creates them.
    """

    def __init__(self, redis: Any, key: Any, node_id: str, address: str, lease: float) -> None:
        self.redis = redis
        self.key = key
        self.node_id = node_id
        self.address = address
        self.lease_ms = max(1, int(lease * 1000))
        self.held: set[tuple[str, str]] = set()
        self._claim, self._release, self._lookup = Script(_CLAIM), Script(_RELEASE), Script(_LOOKUP)

    def _index(self, mode: str, key: str) -> str:
        return self.key("tunnel", mode, key)

    def claim(self, mode: str, key: str) -> Deferred[None]:
        self.held.add((mode, key))
        return self._run_claim([self._index(mode, key)])

    def _run_claim(self, keys: list[str]) -> Deferred[None]:
        d = self.redis.run(self._claim, keys, [self.node_id, self.address, self.lease_ms])
        return d.addCallback(lambda _n: None)

    def release(self, mode: str, key: str) -> Deferred[None]:
        self.held.discard((mode, key))
        d = self.redis.run(self._release, [self._index(mode, key)], [self.node_id])
        return d.addCallback(lambda _n: None)

    def renew(self) -> Deferred[None]:
        keys = sorted(self._index(mode, key) for mode, key in self.held)
        if not keys:
            return succeed(None)
        batches = [self._run_claim(keys[i:i + RENEW_BATCH]) for i in range(0, len(keys), RENEW_BATCH)]
        return gatherResults(batches, consumeErrors=True).addCallback(lambda _r: None)

    def lookup(self, mode: str, keys: list[str]) -> Deferred[list[Claim]]:
        d = self.redis.run(self._lookup, [self._index(mode, k) for k in keys], [])

        def claims(flat: Any) -> list[Claim]:
            items = [v.decode() if isinstance(v, bytes) else str(v) for v in flat or ()]
            return sorted((Claim(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)),
                          key=lambda c: c.node)

        return d.addCallback(claims)

    def release_all(self) -> Deferred[None]:
        held, self.held = sorted(self.held), set()
        if not held:
            return succeed(None)
        d = self.redis.run(self._release, [self._index(m, k) for m, k in held], [self.node_id])
        return d.addCallback(lambda _n: None)
