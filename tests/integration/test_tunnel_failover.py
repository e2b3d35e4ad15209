"""A tunnel client listing several servers: attached to two, failing over to another (SPEC §8)."""

from __future__ import annotations

import textwrap

import pytest
import pytest_twisted

from wmproxy_tw.tunnel.client import TunnelClient

from ..helpers import free_port, start_proxy
from .test_tunnel import curl, feature, mapping, port_of, stop, tagged_origin, tunnel_server, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def listing_client(servers: list[int], mappings: str, extra: str = "") -> object:
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in servers)
    return await start_proxy(textwrap.dedent(f"""\
        [proxy]
        server = [{listed}]
        token = "good-token"
        client_name = "multi"
        """) + extra + "\n" + mappings)


@pytest_twisted.ensureDeferred
async def test_client_stays_attached_to_two_servers_and_both_serve() -> None:
    """server = [S1, S2] (attach defaults to 2): both publish the mapping; losing S1 leaves S2 serving."""
    web = tagged_origin("W")
    s1, s2 = await tunnel_server(), await tunnel_server()
    cli = await listing_client([port_of(s1, "tunnel server"), port_of(s2, "tunnel server")],
                               mapping("web", "http", web.getHost().port, domain="w.test"))
    client = feature(cli, TunnelClient)
    try:
        assert len(client.attachments) == 2
        await until(lambda: all(a.conn is not None and "web" in a.conn.accepted
                                for a in client.attachments))
        for srv in (s1, s2):
            status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{port_of(srv, 'tunnel http')}/x")
            assert (status, body) == (200, b"W /x")
        first = client.attachments[0]
        await stop(s1)
        await until(lambda: first.conn is None)
        status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{port_of(s2, 'tunnel http')}/y")
        assert (status, body) == (200, b"W /y")
    finally:
        await stop(cli, s2, web)


@pytest_twisted.ensureDeferred
async def test_dead_attachment_moves_to_another_listed_server() -> None:
    """attach = 1, the first listed server is down: the attachment moves to the second within its backoff."""
    web = tagged_origin("W")
    srv = await tunnel_server()
    dead = free_port()
    cli = await listing_client([dead, port_of(srv, "tunnel server")],
                               mapping("web", "http", web.getHost().port, domain="w.test"), "attach = 1\n")
    client = feature(cli, TunnelClient)
    try:
        assert len(client.attachments) == 1
        took = await until(lambda: client.conn is not None and "web" in client.conn.accepted, timeout=5.0)
        assert took <= 3.0  # one failed attempt, then the second server after the first backoff (1 s)
        assert client.attachments[0].target.port == port_of(srv, "tunnel server")
        status, body = await curl("-H", "Host: w.test", f"http://127.0.0.1:{port_of(srv, 'tunnel http')}/z")
        assert (status, body) == (200, b"W /z")
    finally:
        await stop(cli, srv, web)


def test_attach_needs_that_many_servers() -> None:
    """attach above the number of listed servers is a configuration error naming both."""
    from wmproxy_tw.config import load_text
    from wmproxy_tw.config.load import ConfigError

    with pytest.raises(ConfigError, match="attach = 3 needs that many servers"):
        load_text('[proxy]\nserver = ["127.0.0.1:1", "127.0.0.1:2"]\nattach = 3\n', "t.toml")
