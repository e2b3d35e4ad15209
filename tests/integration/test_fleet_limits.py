"""Shared limit_req across three in-process nodes and one real redis-server on loopback."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from wmproxy_tw.service import ProxyService

from ..helpers import bound_port, deferLater, feature, start_proxy, until

pytestmark = pytest.mark.integration


def node_conf(redis_url: str, node: str, fail_open: bool = True, shared: bool = True) -> str:
    return f"""disable_control = true
[fleet]
redis = "{redis_url}"
node_id = "{node}"
key_prefix = "lt:"
lease = "2s"
fail_open = {str(fail_open).lower()}
[http]
[http.limit_req_zone]
z = "{{client_ip}} rate=10r/s{' shared' if shared else ''}"
[[http.server]]
bind_addr = "127.0.0.1:0"
limit_req = "zone=z burst=0"
[[http.server.location]]
rule = "/"
static_response = "ok\\n"
"""


class Counter(Protocol):
    """Sends a GET at each of ``times`` (reactor time; later if the previous answer is late) on one
    keep-alive connection; counts the statuses."""

    def __init__(self, times: list[float], statuses: list[int]) -> None:
        self.times = times
        self.statuses = statuses
        self.buf = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def _next(self) -> None:
        if not self.times:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        wait = self.times.pop(0) - reactor.seconds()
        if wait > 0:
            reactor.callLater(wait, self._send)
        else:
            self._send()

    def _send(self) -> None:
        self.transport.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.statuses.append(int(head.split(b" ")[1]))
            self._next()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


async def burst(ports: list[int], total: int = 300, spread: float = 1.0,
                per_node_connections: int = 5) -> tuple[int, float]:
    """``total`` requests evenly spaced over ``spread`` seconds, round-robin over ``ports``
    (keep-alive connections in parallel): (how many were answered 200, the seconds it took).
    Every answer is a 200 or a 503."""
    statuses: list[int] = []
    conns = per_node_connections * len(ports)
    protos = [Counter([], statuses) for _ in range(conns)]
    for i, proto in enumerate(protos):
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ports[i % len(ports)], timeout=5), proto)
    start = reactor.seconds()
    for k in range(total):
        protos[k % conns].times.append(start + spread * k / total)
    for proto in protos:
        proto._next()
    await defer.gatherResults([p.done for p in protos]).addTimeout(30, reactor)
    took = reactor.seconds() - start
    assert len(statuses) == total and set(statuses) <= {200, 503}, set(statuses)
    return statuses.count(200), took


async def three_nodes(redis_url: str, **kw: Any) -> tuple[list[ProxyService], list[int]]:
    nodes = [await start_proxy(node_conf(redis_url, f"n{i}", **kw)) for i in (1, 2, 3)]
    fleets = [feature(svc, "fleet") for svc in nodes]
    await until(lambda: all(f.redis.available for f in fleets))
    return nodes, [bound_port(svc) for svc in nodes]


async def stop_all(nodes: list[ProxyService]) -> None:
    for svc in nodes:
        await svc.stopService()


def allowed_in(seconds: float) -> range:
    """What one 10 r/s bucket with burst 0 lets through in ``seconds``: one at once, then one per 100 ms.
    (9–12 for a burst within 1 s, as the issue demands; wider only if this machine was slower.)"""
    return range(9, max(12, int(seconds * 10) + 2) + 1)


@pytest_twisted.ensureDeferred
async def test_three_nodes_share_one_bucket(redis_server: Any) -> None:
    """rate=10r/s burst=0 shared: 300 requests over three nodes within ~1 s → 9–12 pass in total, not 30."""
    nodes, ports = await three_nodes(redis_server.url)
    try:
        passed, took = await burst(ports)
        assert passed in allowed_in(took), (passed, took)
        zones = [feature(svc, "reverse").zones["z"] for svc in nodes]
        assert sum(z.shared_decisions for z in zones) == 300 and sum(z.local_decisions for z in zones) == 0
        keys = await feature(nodes[0], "fleet").redis.execute("KEYS", "lt:lr:*")
        assert keys == ["lt:lr:z:127.0.0.1"]
        assert 0 < await feature(nodes[0], "fleet").redis.execute("PTTL", keys[0]) <= 1200  # drained → gone
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_local_zones_count_per_node(redis_server: Any) -> None:
    """The same fleet without `shared`: each node counts alone (about three times as many pass)."""
    nodes, ports = await three_nodes(redis_server.url, shared=False)
    try:
        passed, took = await burst(ports)
        assert passed >= 3 * 9, (passed, took)
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_redis_outage_falls_back_to_local_and_recovers(redis_server: Any, fleet_log: list[str]) -> None:
    """Redis stopped: every node keeps serving on its own bucket, one warning per node; Redis back: shared again."""
    nodes, ports = await three_nodes(redis_server.url)
    fleets = [feature(svc, "fleet") for svc in nodes]
    try:
        await redis_server.stop()
        await until(lambda: not any(f.redis.available for f in fleets))
        passed, took = await burst(ports)
        assert passed >= 3 * 9, (passed, took)  # per-node limits: each node lets ~10/s through
        passed, took = await burst(ports)
        warnings = [x for x in fleet_log if "unavailable" in x]
        assert len(warnings) == 3, warnings  # once per node, not per request or retry
        await redis_server.start()
        await until(lambda: all(f.redis.available for f in fleets))
        await deferLater(0.2)  # the local buckets drained meanwhile; so does the (new) shared one
        passed, took = await burst(ports)
        assert passed in allowed_in(took), (passed, took)
        assert len([x for x in fleet_log if "is back" in x]) == 3
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_fail_closed_answers_503_without_redis(redis_server: Any) -> None:
    """fail_open = false: while Redis is away every request of a shared zone gets 503 with Retry-After."""
    nodes, ports = await three_nodes(redis_server.url, fail_open=False)
    try:
        await redis_server.stop()
        await until(lambda: not feature(nodes[0], "fleet").redis.available)
        passed, _took = await burst(ports[:1], total=20, per_node_connections=2)
        assert passed == 0
    finally:
        await stop_all(nodes)
