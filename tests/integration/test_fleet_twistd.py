"""Fleet tunnels as an operator runs them: three twistd nodes, one redis-server, kill -9 (issue 10)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from wmproxy_tw.tunnel.client import TunnelClient

from ..helpers import deferLater, free_port, origin, pattern, run, run_twistd, start_proxy, wait_port
from .test_tunnel import curl, feature, mapping, stop, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SECRET = "fleet-test-secret-0123456789"
LEASE = 2.0


class TwistdNode:
    """One fleet node (tunnel server) as a twistd subprocess with its own ports."""

    def __init__(self, folder: Path, name: str, redis_url: str) -> None:
        self.name = name
        self.http, self.center, self.link = free_port(), free_port(), free_port()
        self.folder = folder / name
        self.folder.mkdir()
        self.conf = self.folder / "wmproxy.toml"
        self.conf.write_text(textwrap.dedent(f"""\
            disable_control = true

            [fleet]
            redis = "{redis_url}"
            node_id = "{name}"
            advertise = "127.0.0.1:{self.link}"
            secret = "{SECRET}"
            lease = "{LEASE:g}s"

            [proxy]
            center_addr = "127.0.0.1:{self.center}"
            tokens = ["good-token"]
            map_http_bind = "127.0.0.1:{self.http}"
            heartbeat_interval = "1s"
            heartbeat_timeout = "3s"
            """))
        self.proc: Any = None

    async def start(self) -> None:
        self.proc = run_twistd(self.conf)
        self.proc.ended.addErrback(lambda _f: None)

    async def ready(self) -> None:
        for port in (self.http, self.center, self.link):
            await wait_port(port, 20.0)


async def redis_exists(port: int, key: str) -> bool:
    out, err, code = await run("redis-cli", "-p", str(port), "EXISTS", key)
    assert code == 0, err
    return out.strip() == b"1"


@pytest_twisted.ensureDeferred
async def test_three_nodes_client_on_b_then_b_killed(tmp_path: Path, redis_server: Any) -> None:
    """Client on B: A and C serve its domain byte-identically; kill -9 B: back through A, B's claims expire."""
    web = origin()
    nodes = {n: TwistdNode(tmp_path, n, redis_server.url) for n in ("a", "b", "c")}
    for node in nodes.values():
        await node.start()
    cli: Any = None
    try:
        for node in nodes.values():
            await node.ready()
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        cli = await start_proxy(textwrap.dedent(f"""\
            [proxy]
            server = ["127.0.0.1:{b.center}", "127.0.0.1:{a.center}"]
            attach = 1
            token = "good-token"
            client_name = "office"
            """) + mapping("web", "http", web.getHost().port, domain="w.test"))
        client = feature(cli, TunnelClient)
        await until(lambda: client.conn is not None and "web" in client.conn.accepted, timeout=10.0)
        assert client.attachments[0].target.port == b.center

        direct_status, direct = await curl(f"http://127.0.0.1:{web.getHost().port}/blob?n=200000")
        assert direct_status == 200 and direct == pattern(200000)
        for node in (b, a, c):
            status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{node.http}/blob?n=200000")
            assert status == 200 and body == direct, node.name
        claim = "wmproxy:tunnel:http:w.test:node:b"
        assert await redis_exists(redis_server.port, claim)

        b.proc.signal("KILL")
        await b.proc.ended
        killed = reactor.seconds()
        # the client (listing B and A) moves to A within its backoff (first retry after 1 s)
        await until(lambda: client.conn is not None and "web" in client.conn.accepted
                    and client.attachments[0].target.port == a.center, timeout=10.0)
        assert reactor.seconds() - killed <= 3.0
        for node in (a, c):
            status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{node.http}/blob?n=200000")
            assert status == 200 and body == direct, node.name
        # B's registry entries expire within the lease
        while await redis_exists(redis_server.port, claim):
            assert reactor.seconds() - killed <= LEASE + 1.0, "B's claim outlived its lease"
            await deferLater(0.1)
    finally:
        if cli is not None:
            await stop(cli)
        await defer.gatherResults([defer.ensureDeferred(n.proc.stop()) for n in nodes.values() if n.proc is not None])
        await stop(web)
