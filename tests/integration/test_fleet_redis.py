"""The fleet's Redis connection and node records against a real redis-server on loopback."""

from __future__ import annotations

import socket

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from wmproxy_tw.fleet.redis import RedisManager, RedisUnavailable, Script

from ..helpers import deferLater, free_port, start_proxy, until

pytestmark = pytest.mark.integration

INCR = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


async def heard(r: RedisManager, channel: str, got: list[str]) -> None:
    """Publish on ``channel`` until a subscriber is there; its callback filled ``got``."""
    before = len(got)
    for _ in range(100):
        if await r.publish(channel, "hello"):
            break
        await deferLater(0.05)
    await until(lambda: len(got) > before and got[-1] == "hello")


async def one_command(url: str, *command: Any) -> Any:
    """One command on a connection of its own."""
    r = RedisManager(reactor, url)
    r.start()
    try:
        await r.when_available(5)
        return await r.execute(*command)
    finally:
        await r.stop()


async def never_available(url: str, **kw: Any) -> None:
    """A manager for ``url`` never becomes available (retrying meanwhile)."""
    bad = RedisManager(reactor, url, max_delay=0.05, **kw)
    bad.start()
    try:
        with pytest.raises(RedisUnavailable):
            await bad.when_available(0.5)
    finally:
        await bad.stop()


@pytest_twisted.ensureDeferred
async def test_commands_scripts_and_noscript_fallback(redis_server: Any) -> None:
    """Commands run; a script runs by EVALSHA and again after SCRIPT FLUSH (NOSCRIPT → EVAL)."""
    r = RedisManager(reactor, redis_server.url)
    r.start()
    try:
        await r.when_available(5)
        assert await r.execute("SET", "k", "v") == "OK" and await r.execute("GET", "k") == "v"
        assert await r.run(INCR, ["n"], [2]) == 2
        await r.execute("SCRIPT", "FLUSH")
        assert await r.run(INCR, ["n"], [3]) == 5
        assert await r.execute("SCRIPT", "EXISTS", INCR.sha) == [1]  # cached again by EVAL
        sock = r._commands.proto.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # no Nagle delay on commands
    finally:
        await r.stop()
    with pytest.raises(RedisUnavailable):
        await r.execute("GET", "k")


@pytest_twisted.ensureDeferred
async def test_nothing_listens_fails_fast_and_logs_once(fleet_log: list[str]) -> None:
    """With no Redis, commands fail at once (RedisUnavailable); the outage is one warning, not one per retry."""
    r = RedisManager(reactor, f"redis://127.0.0.1:{free_port()}/0", max_delay=0.05)
    r.start()
    try:
        await deferLater(0.5)  # several retries
        with pytest.raises(RedisUnavailable):
            await r.execute("PING")
        with pytest.raises(RedisUnavailable):
            await r.when_available(0.1)
    finally:
        await r.stop()
    assert len([x for x in fleet_log if "unavailable" in x]) == 1 and r.outages == 1


@pytest_twisted.ensureDeferred
async def test_outage_and_recovery(redis_server: Any, fleet_log: list[str]) -> None:
    """Redis stopped: one warning, commands fail fast; Redis back: reconnected, one 'back' line, scripts reloaded."""
    r = RedisManager(reactor, redis_server.url, max_delay=0.2)
    changes: list[bool] = []
    r.on_change(changes.append)
    got: list[str] = []
    r.subscribe("ch", lambda _c, m: got.append(m))
    r.start()
    try:
        await r.when_available(5)
        await redis_server.stop()
        await until(lambda: not r.available)
        await deferLater(0.5)  # retries meanwhile
        with pytest.raises(RedisUnavailable):
            await r.run(INCR, ["n"], [1])
        await redis_server.start()
        await r.when_available(5)
        assert await r.execute("SCRIPT", "EXISTS", INCR.sha) == [1]
        await heard(r, "ch", got)  # the subscriber connection came back too and re-subscribed
    finally:
        await r.stop()
    assert changes == [True, False, True]
    assert [x for x in fleet_log if "unavailable" in x or "is back" in x][-2:][0].count("unavailable") == 1
    assert len([x for x in fleet_log if "unavailable" in x]) == 1
    assert len([x for x in fleet_log if "is back" in x]) == 1


@pytest_twisted.ensureDeferred
async def test_password_and_db_from_the_url(tmp_path: Any) -> None:
    """AUTH with the URL's password and SELECT of its db happen before the connection is ready."""
    from ..helpers import RedisServer

    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    await server.start()
    try:
        good = RedisManager(reactor, f"redis://:s3cret@127.0.0.1:{server.port}/3")
        good.start()
        await good.when_available(5)
        await good.execute("SET", "x", "1")
        assert await good.execute("DBSIZE") == 1
        await good.execute("SELECT", "0")
        assert await good.execute("DBSIZE") == 0
        await good.stop()
        await never_available(f"redis://:wrong@127.0.0.1:{server.port}/0")
    finally:
        await server.stop()


def _fleet_conf(redis_url: str, node: str, lease: str = "1s") -> str:
    return (f'disable_control = true\n[proxy]\nbind = "127.0.0.1:0"\n'
            f'[fleet]\nredis = "{redis_url}"\nnode_id = "{node}"\nadvertise = "127.0.0.1:{7000 + int(node[-1])}"\n'
            f'lease = "{lease}"\nkey_prefix = "t:"\n')


@pytest_twisted.ensureDeferred
async def test_node_records_status_and_expiry(redis_server: Any) -> None:
    """Three nodes see each other in /status; a stopped node leaves; a dead one expires within its lease."""
    nodes = [await start_proxy(_fleet_conf(redis_server.url, f"n{i}")) for i in (1, 2, 3)]
    try:
        fleets = [next(f for f in svc.features if f.name == "fleet") for svc in nodes]
        await until(lambda: all(f.redis.available for f in fleets))
        listed = await fleets[0].nodes()
        assert [n["node_id"] for n in listed] == ["n1", "n2", "n3"]
        assert listed[1]["advertise"] == "127.0.0.1:7002" and listed[1]["config_hash"]
        doc = await defer.maybeDeferred(nodes[0].control_status)
        assert doc["fleet"]["node_id"] == "n1" and [n["node_id"] for n in doc["fleet"]["nodes"]] == ["n1", "n2", "n3"]
        # a graceful stop removes the record at once
        await nodes[2].stopService()
        assert [n["node_id"] for n in await fleets[0].nodes()] == ["n1", "n2"]
        # a node that dies (no more heartbeats, no goodbye) expires with its lease (1 s)
        fleets[1]._beat.stop()
        fleets[1].leave = lambda: defer.succeed(None)  # type: ignore[method-assign]  # it "died": no goodbye
        await deferLater(1.2)
        assert [n["node_id"] for n in await fleets[0].nodes()] == ["n1"]
        assert await fleets[0].redis.execute("TTL", "t:node:n1") >= 0  # every key has an expiry
    finally:
        for svc in nodes:
            if svc.running:
                await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_duplicate_node_id_is_logged(redis_server: Any, fleet_log: list[str]) -> None:
    """Two processes with one node_id: a warning says node ids must be unique (once); a restart
    (the previous process's record still there) is not one."""
    a = await start_proxy(_fleet_conf(redis_server.url, "n1"))
    fa = next(f for f in a.features if f.name == "fleet")
    await until(lambda: fa.fleet_nodes != [])
    fa.leave = lambda: defer.succeed(None)  # type: ignore[method-assign]  # gone without a goodbye: the record stays
    await a.stopService()
    assert await one_command(redis_server.url, "GET", "t:node:n1")
    a = await start_proxy(_fleet_conf(redis_server.url, "n1"))
    fa = next(f for f in a.features if f.name == "fleet")
    await until(lambda: fa._wrote)
    await deferLater(0.5)
    assert not any("also used" in x for x in fleet_log)
    b = await start_proxy(_fleet_conf(redis_server.url, "n1"))
    try:
        await until(lambda: any("also used by another process" in x for x in fleet_log), 5)
        await deferLater(0.5)
        assert len([x for x in fleet_log if "also used" in x]) <= 2  # at most once per process
    finally:
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_keeps_the_connection(redis_server: Any) -> None:
    """A reload with the same Redis settings keeps the one connection and the node record."""
    from wmproxy_tw.config import load_text

    svc = await start_proxy(_fleet_conf(redis_server.url, "n1"))
    try:
        old = next(f for f in svc.features if f.name == "fleet")
        await until(lambda: old.redis.available)
        svc.reload(load_text(_fleet_conf(redis_server.url, "n1") + "# changed\n", "test.toml"))
        new = next(f for f in svc.features if f.name == "fleet")
        assert new is not old and new.redis is old.redis and new.redis.available
        assert new.redis.users == [new] and len(new.redis._channels["t:reload"]) == 1  # old handler gone
        assert [n["node_id"] for n in await new.nodes()] == ["n1"]
        clients = await new.redis.execute("CLIENT", "LIST")
        assert clients.count("cmd=") == 2 and clients.count(" sub=1 ") == 1  # commands + subscriber, as before
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_failed_reload_leaves_the_fleet_alone(redis_server: Any) -> None:
    """A reload that fails (a port in use) leaves the running fleet feature and its connection as they were."""
    from wmproxy_tw.config import load_text
    from wmproxy_tw.service import ReloadError

    from ..helpers import echo_server

    svc = await start_proxy(_fleet_conf(redis_server.url, "n1"))
    busy = echo_server()
    try:
        old = next(f for f in svc.features if f.name == "fleet")
        await until(lambda: old.redis.available)
        text = _fleet_conf(redis_server.url, "n1").replace('"127.0.0.1:0"', f'"127.0.0.1:{busy.getHost().port}"')
        with pytest.raises(ReloadError):
            svc.reload(load_text(text, "test.toml"))
        assert old.redis.users == [old] and next(f for f in svc.features if f.name == "fleet") is old
        assert [n["node_id"] for n in await old.heartbeat()] == ["n1"]
    finally:
        await svc.stopService()
        await busy.stopListening()
    assert not old.redis.available and not old.redis._commands.running


@pytest_twisted.ensureDeferred
async def test_a_hanging_redis_is_an_outage(redis_server: Any, fleet_log: list[str]) -> None:
    """Redis frozen (SIGSTOP): the reply deadline fails the command and starts an outage; SIGCONT: both
    connections back (the subscriber one, which could not notice, is opened again too)."""
    r = RedisManager(reactor, redis_server.url, reply_timeout=0.3, connect_timeout=0.3, max_delay=0.1)
    got: list[str] = []
    r.subscribe("ch", lambda _c, m: got.append(m))
    r.start()
    try:
        await r.when_available(5)
        await heard(r, "ch", got)
        first = r._subscriber.proto
        redis_server.proc.signal("STOP")
        with pytest.raises(RedisUnavailable):
            await r.execute("PING")
        await until(lambda: not r.available)  # the connection was aborted
        redis_server.proc.signal("CONT")
        await r.when_available(5)
        assert await r.execute("PING") == "PONG"
        await heard(r, "ch", got)
        assert r._subscriber.proto is not first  # opened again with the command connection
    finally:
        redis_server.proc.signal("CONT")
        await r.stop()
    assert len([x for x in fleet_log if "unavailable" in x]) == 1


@pytest_twisted.ensureDeferred
async def test_rediss_verified_with_tls_ca(tmp_path: Any) -> None:
    """rediss:// connects over TLS, verified against tls_ca; an unknown CA is an outage, never cleartext."""
    from ..helpers import RedisServer
    from ..tlsutil import make_cert

    cert, key = make_cert(tmp_path, "localhost")
    tls_port = free_port()
    server = RedisServer(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                         "--tls-ca-cert-file", cert, "--tls-auth-clients", "no")
    await server.start()
    try:
        good = RedisManager(reactor, f"rediss://localhost:{tls_port}/0", tls_ca=cert)
        good.start()
        await good.when_available(5)
        assert await good.execute("PING") == "PONG"
        await good.stop()
        (tmp_path / "other").mkdir()
        other, _ = make_cert(tmp_path / "other", "localhost")
        await never_available(f"rediss://localhost:{tls_port}/0", tls_ca=other)
    finally:
        await server.stop()
