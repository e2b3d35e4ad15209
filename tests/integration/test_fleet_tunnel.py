"""Fleet tunnels in one process: nodes share an in-memory directory and talk over real links."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from wmproxy_tw.service import ProxyService
from wmproxy_tw.tunnel.directory import MemoryDirectory, MemoryTable
from wmproxy_tw.tunnel.fleet import FleetTunnels
from wmproxy_tw.tunnel.server import TunnelServer

from ..helpers import echo_server, origin, pattern, raw_connect
from .test_tunnel import curl, feature, mapping, port_of, stop, tunnel_client, tunnel_server, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

SECRET = "fleet-secret"


class LateFactory(Factory):
    """The link listener's factory, bound before the fleet part exists (its port is its address)."""

    noisy = False

    def __init__(self, fleet: list[FleetTunnels]) -> None:
        self.fleet = fleet

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.fleet[0].link_factory().buildProtocol(addr)


class Node:
    """A tunnel server with its fleet part on a shared table and a link listener."""

    def __init__(self, svc: ProxyService, name: str, table: MemoryTable, secret: str = SECRET) -> None:
        self.svc = svc
        self.server: TunnelServer = feature(svc, TunnelServer)
        self.link_port: Any = None
        self.name = name
        self.table = table
        self.secret = secret

    def start(self) -> None:
        fleet: list[FleetTunnels] = []
        self.link_port = reactor.listenTCP(0, LateFactory(fleet), interface="127.0.0.1")
        directory = MemoryDirectory(self.table, self.name, f"127.0.0.1:{self.link_port.getHost().port}",
                                    reactor, lease=3.0)
        self.fleet = FleetTunnels(self.server, directory, self.secret)
        fleet.append(self.fleet)
        self.server.fleet = self.fleet

    async def stop(self) -> None:
        await self.fleet.stop()
        await self.link_port.stopListening()
        await stop(self.svc)

    def http(self) -> int:
        return port_of(self.svc, "tunnel http")


async def fleet_nodes(*names: str, secrets: dict[str, str] | None = None) -> list[Node]:
    table = MemoryTable()
    nodes = []
    for name in names:
        svc = await tunnel_server('map_tcp_bind = "127.0.0.1:0"\n')
        node = Node(svc, name, table, (secrets or {}).get(name, SECRET))
        node.start()
        nodes.append(node)
    return nodes


@pytest_twisted.ensureDeferred
async def test_requests_on_other_nodes_reach_the_client_byte_identical(tmp_path: Path) -> None:
    """A client attached to B only: HTTP via A and C is byte-identical to direct; TCP via A too."""
    web, echo = origin(), echo_server()
    a, b, c = await fleet_nodes("a", "b", "c")
    cli = await tunnel_client(b.svc, mapping("web", "http", web.getHost().port, domain="w.test")
                              + mapping("echo", "tcp", echo.getHost().port))
    try:
        await until(lambda: ("http", "w.test") in a.table.entries and ("tcp", "") in a.table.entries)
        # the first request to C waits for its link to B: its body is held meanwhile, not lost
        upload = tmp_path / "upload"
        upload.write_bytes(pattern(1_000_000))
        status, body = await curl("-H", "Host: w.test", "--data-binary", f"@{upload}",
                                  f"http://127.0.0.1:{c.http()}/echo")
        assert status == 200 and body == pattern(1_000_000)
        direct_status, direct = await curl(f"http://127.0.0.1:{web.getHost().port}/blob?n=300000")
        assert direct_status == 200 and direct == pattern(300000)
        for node in (a, c, b):
            status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{node.http()}/blob?n=300000")
            assert status == 200 and body == direct, node.name
        # keep-alive: two requests on one connection through A reuse one link stream
        status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{a.http()}/blob?n=10",
                                  f"http://127.0.0.1:{a.http()}/blob?n=20")
        assert body == pattern(10) + b"\n200" + pattern(20)
        assert list(a.fleet.pool.links) == ["b"]  # one pooled link per peer node
        # unknown host stays a 404 on every node
        status, _ = await curl("-H", "Host: nobody.test", f"http://127.0.0.1:{a.http()}/")
        assert status == 404
        # map_tcp_bind on A reaches B's tcp client
        raw = await raw_connect(port_of(a.svc, "tunnel tcp"))
        raw.transport.write(b"ping through the fleet")
        assert await raw.wait_for(b"ping through the fleet") == b"ping through the fleet"
        raw.transport.loseConnection()
        # the tcp client leaves: a new connection on A's map_tcp_bind is closed at once
        await stop(cli)
        cli = None
        await until(lambda: ("tcp", "") not in a.table.entries)
        raw = await raw_connect(port_of(a.svc, "tunnel tcp"))
        await raw.closed
    finally:
        if cli is not None:
            await stop(cli)
        for node in (a, b, c):
            await node.stop()
        await stop(web, echo)


@pytest_twisted.ensureDeferred
async def test_a_wrong_fleet_secret_is_refused() -> None:
    """A node with another secret cannot use the link: its requests get the plain 404."""
    web = origin()
    a, b = await fleet_nodes("a", "b", secrets={"a": "not-the-secret"})
    cli = await tunnel_client(b.svc, mapping("web", "http", web.getHost().port, domain="w.test"))
    try:
        status, _ = await curl("-H", "Host: w.test", f"http://127.0.0.1:{a.http()}/")
        assert status == 404
        assert not a.fleet.pool.links
    finally:
        await stop(cli)
        for node in (a, b):
            await node.stop()
        await stop(web)
