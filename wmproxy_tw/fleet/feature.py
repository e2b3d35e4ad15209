"""``[fleet]`` as a feature: this node's record in Redis, the live fleet for ``/status``.

This node's record (:mod:`.nodes`: ``node_id``, ``advertise``, ``pid``,
``started``, ``config_hash``, ``version``, ``instance``) is written with a
TTL of ``lease`` and renewed every ``lease / 3``.

A node that stops gracefully removes its record; one that dies disappears
within ``lease``.  Two processes using one ``node_id`` see each other's
``instance`` in the record and log it (once).

The feature owns the process's :class:`~wmproxy_tw.fleet.redis.RedisManager`
(``.redis``); on reload a new feature with the same Redis settings takes the
connection over instead of opening another.  The builder puts the feature in
``ctx.fleet`` so that features built after it (shared ``limit_req`` zones)
can reach Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__
from ..config.model import Config
from ..feature import BuildContext, Feature, IFeature
from ..control.api import ReloadError
from .nodes import HEARTBEAT, NODES, live_nodes
from .reload import answer, request_channel
from .redis import RedisManager, RedisUnavailable

__all__ = ["FleetFeature", "build", "node_id_of"]

_log = Logger()

def node_id_of(config: Config) -> str:
    """``node_id``, or this host's name and a suffix stable across restarts (from
    ``advertise``, else the control address): unique as long as two instances on
    one host differ in those.  Set ``node_id`` when they don't."""
    assert config.fleet is not None
    if config.fleet.node_id:
        return config.fleet.node_id
    where = str(config.fleet.advertise or config.control)
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{hashlib.sha1(where.encode()).hexdigest()[:6]}"


def build(ctx: BuildContext, config: Config) -> list[IFeature]:
    """The fleet feature when ``[fleet]`` is present (and ``ctx.fleet`` pointing at it)."""
    if config.fleet is None:
        return []
    feature = FleetFeature(ctx, config)
    ctx.fleet = feature
    return [feature]


def _redis_settings(config: Config) -> tuple[Any, ...]:
    f = config.fleet
    assert f is not None
    return (f.redis, f.password, f.tls_ca)


class FleetFeature(Feature):
    """Keeps this node's record alive in Redis; lists the fleet."""

    name = "fleet"

    def __init__(self, ctx: BuildContext, config: Config) -> None:
        super().__init__()
        assert config.fleet is not None
        self.reactor = ctx.reactor
        self.controller = ctx.controller
        self.config = config
        self.settings = fleet = config.fleet
        self.node_id = node_id_of(config)
        self.prefix = fleet.key_prefix
        self.lease = fleet.lease
        self.redis = RedisManager(ctx.reactor, fleet.redis, password=fleet.password, tls_ca=fleet.tls_ca)
        self.instance = uuid.uuid4().hex[:12]
        self.started = 0.0
        self.fleet_nodes: list[dict[str, Any]] = []  # as of the last heartbeat
        self._beat: Optional[LoopingCall] = None
        self._left: Optional[defer.Deferred[Any]] = None
        self._warned_duplicate = False
        self._wrote = False  # this feature's record is in Redis (a heartbeat succeeded)

    # -- keys ---------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        """A Redis key under this fleet's prefix: ``key("node", id)`` → ``wmproxy:node:id``."""
        return self.prefix + ":".join(parts)

    # -- life ------------------------------------------------------------------------
    def carry_state_from(self, old: IFeature) -> None:
        if not isinstance(old, FleetFeature):
            return
        # (``old`` is left untouched: if this reload fails, it runs on)
        self.instance, self.started = old.instance, old.started
        self.fleet_nodes = old.fleet_nodes
        if _redis_settings(old.config) == _redis_settings(self.config):
            self.redis = old.redis  # same Redis: keep the connection (see RedisManager.users)

    def start(self) -> None:
        super().start()
        if not self.started:
            self.started = self.reactor.seconds()
        self.redis.load(HEARTBEAT)
        self.redis.load(NODES)
        self.redis.users.append(self)
        self.redis.on_change(self._availability)
        self.redis.subscribe(request_channel(self.prefix), self._reload_requested).addErrback(lambda _f: None)
        self.redis.start()
        self._beat = LoopingCall(self.heartbeat)
        self._beat.clock = self.reactor
        self._beat.start(max(self.lease / 3, 0.1), now=True).addErrback(
            lambda f: _log.failure("fleet: heartbeat loop failed", f))

    def stop(self) -> None:
        super().stop()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        self.redis.off_change(self._availability)
        self.redis.unsubscribe(request_channel(self.prefix), self._reload_requested)
        users = self.redis.users
        if self in users:
            users.remove(self)
        left: defer.Deferred[Any] = defer.succeed(None)
        if not any(f.node_id == self.node_id for f in users):
            left = self.leave()  # not replaced by a feature with the same id on this connection
        if not users:
            redis = self.redis
            left.addBoth(lambda _: redis.stop())  # the record's removal goes out before the close
            left.addErrback(lambda f: _log.failure("fleet: closing Redis failed", f))

    def _availability(self, available: bool) -> None:
        if available and self._beat is not None:
            self.heartbeat()  # re-register at once after an outage

    def shared_zone(self, name: str, spec: Any) -> Any:
        """A ``limit_req_zone ... shared`` decided through this fleet's Redis."""
        from .limits import SharedRequestZone

        return SharedRequestZone(name, spec, self.reactor, self)

    # -- the node record ---------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "advertise": str(self.settings.advertise) if self.settings.advertise else None,
                "pid": os.getpid(), "started": round(self.started, 3), "config_hash": self.config_hash(),
                "version": __version__, "instance": self.instance}

    def config_hash(self) -> str:
        """SHA-256 of the running configuration as loaded (equal on nodes that run the same file)."""
        return hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()[:16]

    def heartbeat(self) -> defer.Deferred[Any]:
        """Renew this node's record (TTL ``lease``), then refresh :attr:`fleet_nodes`."""
        if not self.redis.available:
            return defer.succeed(None)
        doc = json.dumps(self.record(), sort_keys=True)
        d = self.redis.run(HEARTBEAT, [self.key("node", self.node_id), self.key("nodes")],
                           [self.node_id, doc, int(self.lease * 1000)])
        d.addCallback(self._check_duplicate)
        d.addCallback(lambda _: self.nodes())
        d.addErrback(self._redis_failed, "heartbeat")
        return d

    def _check_duplicate(self, old: Any) -> None:
        # Someone else's record where we wrote ours a beat ago: a live process with our id.
        # (On our first beat it may be the record of this node's previous, dead process.)
        wrote, self._wrote = self._wrote, True
        if not old or not wrote or self._warned_duplicate:
            return
        try:
            other = json.loads(old)
        except ValueError:
            return
        if isinstance(other, dict) and other.get("instance") not in (None, self.instance):
            self._warned_duplicate = True
            _log.warn("fleet: node_id {id} is also used by another process (pid {pid}, advertise {adv}): "  # noqa: G010
                      "node ids must be unique in a fleet; set [fleet] node_id", id=self.node_id,
                      pid=other.get("pid"), adv=other.get("advertise"))

    def nodes(self) -> defer.Deferred[list[dict[str, Any]]]:
        """The live nodes (records whose lease runs), sorted by node id; also kept in :attr:`fleet_nodes`."""

        def keep(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
            self.fleet_nodes = nodes
            return nodes

        return live_nodes(self.redis, self.prefix).addCallback(keep)

    def leave(self) -> defer.Deferred[Any]:
        """Remove this node's record now (a graceful stop); best effort, fires when Redis answered."""
        if self._left is not None:
            return self._left
        if not self.redis.available:
            return defer.succeed(None)
        self._left = defer.gatherResults([
            self.redis.execute("DEL", self.key("node", self.node_id)),
            self.redis.execute("ZREM", self.key("nodes"), self.node_id)], consumeErrors=True)
        self._left.addErrback(lambda _f: None)
        return self._left

    def drain(self) -> defer.Deferred[Any]:
        """A graceful stop waits until the node's record is gone (other nodes stop listing it at once)."""
        return self.leave()

    # -- fleet-wide reload (wmproxy reload --fleet) -----------------------------------------
    def _reload_requested(self, _channel: str, message: str) -> None:
        """Reload from this node's own file; answer on the request's reply channel."""
        try:
            request = json.loads(message)
            reply = request["reply"]
        except (ValueError, TypeError, KeyError):
            _log.warn("fleet: ignoring a malformed reload request: {m!r}", m=message[:200])  # noqa: G010
            return
        if not isinstance(reply, str) or not reply.startswith(self.prefix + "reload:reply:"):
            return
        _log.info("fleet: reload requested through Redis")
        if self.controller is None:
            result: Any = ["this process cannot reload (no controller)"]
            return self._answer(request, reply, result)
        d = defer.maybeDeferred(self.controller.control_reload)
        d.addErrback(lambda f: f.value.errors if f.check(ReloadError) else _crashed(f))
        d.addCallback(lambda result: self._answer(request, reply, result))

    def _answer(self, request: dict[str, Any], reply: str, result: Any) -> None:
        # after a reload this feature is stopped: answer through the running one's connection
        current = [f for f in getattr(self.controller, "features", ()) if isinstance(f, FleetFeature)]
        redis = current[0].redis if current else self.redis
        text = answer(request, self.node_id, result)
        d = redis.when_available(2.0).addCallback(lambda _: redis.publish(reply, text))
        d.addErrback(self._redis_failed, "answering a reload request")

    def _redis_failed(self, f: Failure, what: str) -> None:
        if f.check(RedisUnavailable):
            return  # the outage is logged once by the manager
        _log.warn("fleet: {what} failed: {e}", what=what, e=f.getErrorMessage())  # noqa: G010

    # -- observing ------------------------------------------------------------------------
    def fleet_status(self) -> dict[str, Any]:
        """``/status`` → ``fleet``: this node, Redis, and the nodes seen at the last heartbeat."""
        return {"node_id": self.node_id, "redis": str(self.redis.url), "available": self.redis.available,
                "outages": self.redis.outages, "lease": self.lease, "nodes": self.fleet_nodes}

    def snapshot(self) -> dict[str, Any]:
        return self.fleet_status()

    def plan_notes(self) -> list[str]:
        return [f"fleet node {self.node_id} via Redis at {self.redis.url}"
                + (f", advertising {self.settings.advertise}" if self.settings.advertise else "")]


def _crashed(f: Failure) -> list[str]:
    _log.failure("fleet: reload crashed", f)
    return [f"internal error: {f.getErrorMessage()}"]
