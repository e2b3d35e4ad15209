"""Reverse proxy under load: balancing, failover and health checks, 200 MB bodies with flat memory,
and the twistd quick mode."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from ..helpers import bound_port, deferLater, run, start_proxy
from .revutil import TWISTD, Nginx, Origin, free_port, have_nginx, rss_mb, sha256_file, spawn, wait_port, write_blob

pytestmark = pytest.mark.integration


async def _stop(*things: Any) -> None:
    for t in things:
        await defer.maybeDeferred(getattr(t, "stopService", None) or t.stop)


def _group_conf(members: str, extra_group: str = "", extra_loc: str = "") -> str:
    return textwrap.dedent(f"""
        [[http.upstream]]
        name = "backend"
        server = [{members}]
        {extra_group}
        [[http.server]]
        bind_addr = "127.0.0.1:0"
        [[http.server.location]]
        proxy_url = "http://backend"
        {extra_loc}
    """)


async def _names(url: str, n: int, *curl_args: str) -> list[str]:
    out, err, code = await run("curl", "-sS", *curl_args, *([url] * n))
    assert code == 0, err
    return [line.split()[0] for line in out.decode().splitlines()]


@pytest_twisted.ensureDeferred
async def test_weighted_round_robin_splits_3_to_1() -> None:
    """1,000 requests over weights 3:1 split 750/250 (within ±2%)."""
    a, b = Origin("a"), Origin("b")
    svc = await start_proxy(_group_conf(f'{{ addr = "{a.addr}", weight = 3 }}, {{ addr = "{b.addr}", weight = 1 }}'))
    try:
        counts = Counter(await _names(f"http://127.0.0.1:{bound_port(svc)}/x", 1000))
        assert sum(counts.values()) == 1000
        assert abs(counts["a"] - 750) <= 20 and abs(counts["b"] - 250) <= 20, counts
    finally:
        await _stop(svc, a, b)


@pytest_twisted.ensureDeferred
async def test_least_conn_favours_the_idle_member() -> None:
    """While one member holds a slow request, least_conn sends every other request to the idle one."""
    a, b = Origin("a"), Origin("b")
    svc = await start_proxy(_group_conf(f'"{a.addr}", "{b.addr}"', 'lb = "least_conn"'))
    url = f"http://127.0.0.1:{bound_port(svc)}"
    try:
        slow = defer.ensureDeferred(run("curl", "-sS", f"{url}/slow"))
        for _ in range(100):
            if any(p == b"/slow" for _m, p in a.res.seen + b.res.seen):
                break
            await deferLater(0.01)
        busy = "a" if a.res.seen else "b"
        names = await _names(f"{url}/quick", 20)
        assert names == ["b" if busy == "a" else "a"] * 20
        out, _e, _c = await slow
        assert out.decode() == f"{busy} slow\n"
    finally:
        await _stop(svc, a, b)


@pytest_twisted.ensureDeferred
async def test_ip_hash_pins_each_client() -> None:
    """ip_hash: every request of one client address goes to the same member; clients spread over both."""
    a, b = Origin("a"), Origin("b")
    svc = await start_proxy(_group_conf(f'"{a.addr}", "{b.addr}"', 'lb = "ip_hash"'))
    url = f"http://127.0.0.1:{bound_port(svc)}/x"
    try:
        pinned = {}
        for i in range(1, 9):
            names = set(await _names(url, 10, "--interface", f"127.0.0.{i}"))
            assert len(names) == 1, (i, names)
            pinned[i] = names.pop()
        assert set(pinned.values()) == {"a", "b"}, pinned
    finally:
        await _stop(svc, a, b)


@pytest_twisted.ensureDeferred
async def test_member_killed_mid_run_then_revived_by_health_checks() -> None:
    """A member dies mid-run: no request fails (connect errors retried on the other member); once it is
    back the active check returns it within rise × interval."""
    a, b = Origin("a"), Origin("b")
    svc = await start_proxy(_group_conf(
        f'{{ addr = "{a.addr}", max_fails = 2, fail_timeout = "30s" }}, '
        f'{{ addr = "{b.addr}", max_fails = 2, fail_timeout = "30s" }}',
        'health_check = { interval = "0.2s", path = "/health", timeout = "0.5s", fall = 1, rise = 2 }'))
    feature = next(f for f in svc.features if f.name == "reverse")
    group = next(iter(feature.groups()))
    served = {"n": 0}
    render = b.res.render

    def counting(request: Any) -> Any:
        served["n"] += 1
        if served["n"] == 50:
            reactor.callLater(0, lambda: defer.ensureDeferred(b.kill()))
        return render(request)

    b.res.render = counting  # type: ignore[method-assign]
    url = f"http://127.0.0.1:{bound_port(svc)}/x"
    try:
        names = await _names(url, 400)
        assert len(names) == 400 and set(names) <= {"a", "b"}  # every request answered by a member
        assert names.count("b") >= 45 and names[-100:] == ["a"] * 100
        b.revive()
        started = reactor.seconds()
        while not all(m["state"] == "up" for m in group.snapshot()["members"]):
            assert reactor.seconds() - started < 2 * 0.2 + 0.5, group.snapshot()
            await deferLater(0.05)
        counts = Counter(await _names(url, 20))
        assert counts["b"] == 10, counts
    finally:
        await _stop(svc, a, b)


class SlowReader(Protocol):
    """GETs a URL and reads at most ``rate`` bytes per second."""

    def __init__(self, request: bytes, rate: int) -> None:
        self.request = request
        self.rate = rate
        self.got = 0
        self.budget = 0

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(0.1)

    def tick(self) -> None:
        self.budget = self.rate // 10
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)
        self.budget -= len(data)
        if self.budget <= 0:
            self.transport.pauseProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()


@pytest.mark.skipif(not have_nginx(), reason="nginx is installed by make test-deps")
@pytest_twisted.ensureDeferred
async def test_200mb_both_ways_byte_identical_with_flat_memory(tmp_path: Path) -> None:
    """A 200 MB download (nginx origin) and a 200 MB chunked upload through a twistd proxy are
    byte-identical, and the proxy's RSS stays within +50 MB, also while a client reads slowly."""
    size = 200 * 1024 * 1024
    www = tmp_path / "www"
    www.mkdir()
    digest = write_blob(www / "blob", size)
    nginx = await Nginx(tmp_path, [f"root {www};"]).start()
    o = Origin("o")
    port = free_port()
    conf = tmp_path / "conf.toml"
    conf.write_text(textwrap.dedent(f"""
        [[http.server]]
        bind_addr = "127.0.0.1:{port}"
        [[http.server.location]]
        rule = "/blob"
        proxy_url = "http://127.0.0.1:{nginx.ports[0]}"
        [[http.server.location]]
        proxy_url = "http://{o.addr}"
    """))
    proxy = spawn([TWISTD, "-n", "--pidfile=", "wmproxy", "-c", str(conf)], cwd=tmp_path)
    samples: list[float] = []
    sampler = task.LoopingCall(lambda: samples.append(rss_mb(proxy.pid)))
    try:
        await wait_port(port)
        url = f"http://127.0.0.1:{port}"
        _o, _e, _c = await run("curl", "-sS", "-o", "/dev/null", f"{url}/blob", "-r", "0-1048575")
        baseline = rss_mb(proxy.pid)
        sampler.start(0.05)
        out = tmp_path / "down"
        _o, err, code = await run("curl", "-sS", "-o", str(out), f"{url}/blob")
        assert code == 0, err
        assert out.stat().st_size == size
        assert sha256_file(out) == digest
        out.unlink()
        reader = SlowReader(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n", rate=4 * 1024 * 1024)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
        for _ in range(100):
            if reader.got:
                break
            await deferLater(0.05)
        await deferLater(2.0)
        assert 0 < reader.got < 20 * 1024 * 1024, proxy.err[-2000:]
        reader.transport.abortConnection()
        body, err, code = await run("curl", "-sS", "-T", str(www / "blob"), "-H", "Transfer-Encoding: chunked",
                                    f"{url}/upload")
        assert code == 0, err
        assert body.decode() == f"{digest} {size}\n"
        sampler.stop()
        assert max(samples) - baseline < 50, (baseline, max(samples))
        assert b"Traceback" not in proxy.err + proxy.out and b"Unhandled" not in proxy.err + proxy.out, proxy.err[-3000:]
    finally:
        if sampler.running:
            sampler.stop()
        await proxy.stop()
        await _stop(nginx, o)


@pytest_twisted.ensureDeferred
async def test_twistd_reverse_proxy_quick_mode() -> None:
    """`twistd -n wmproxy reverse-proxy -b ADDR -t URL` proxies to the URL; --check describes it."""
    o = Origin("o")
    port = free_port()
    args = ["wmproxy", "reverse-proxy", "-b", f"127.0.0.1:{port}", "-t", f"http://{o.addr}", "--no-control"]
    out, err, code = await run(TWISTD, "wmproxy", "--check", *args[1:])
    assert code == 0 and f"reverse proxy (http) on 127.0.0.1:{port}" in out.decode(), err
    out, err, code = await run(TWISTD, "-n", "--pidfile=", "wmproxy", "reverse-proxy", "-b", "x")
    assert code != 0 and b"-t URL is required" in out + err
    proxy = spawn([TWISTD, "-n", "--pidfile=", *args])
    try:
        await wait_port(port)
        out, err, code = await run("curl", "-sS", f"http://127.0.0.1:{port}/hello?x=1")
        assert out == b"o GET /hello?x=1\n", err
        assert b"Traceback" not in proxy.err + proxy.out
    finally:
        await proxy.stop()
        await _stop(o)
