"""The fleet's tunnel directory: which nodes hold which tunnel client's domains and ports.

A node *claims* ``(mode, key)`` when one of its tunnel clients registers it (``key`` is a domain as
registered, lower case, possibly ``*.`` wildcard, for ``http``/``https``; ``""`` for the
``map_tcp_bind`` / ``map_proxy_bind`` default of ``tcp``/``proxy``), *renews* all its claims on
every fleet heartbeat and *releases* them when the client goes.  A claim is a lease: it lapses
``lease`` seconds after its last renewal, so the claims of a node that died vanish on their own.
:meth:`ITunnelDirectory.lookup` answers which live nodes hold the first of several keys (a
request's host, then its ``*.`` suffixes), with the inter-node address each advertised.

:class:`MemoryDirectory` keeps the table in a :class:`MemoryTable` shared by the nodes of a unit
test; :class:`RedisDirectory` (in :mod:`wmproxy_tw.fleet.tunnels`) keeps it in Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

__all__ = ["Claim", "ITunnelDirectory", "MemoryDirectory", "MemoryTable", "lookup_keys"]


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
