"""10,000 concurrent idle keep-alive connections held by a twistd reverse proxy while it keeps
serving other clients (issue #9, SPEC §10/§11: memory per idle connection)."""

from __future__ import annotations

import resource
import shutil
import textwrap
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ClientFactory, Protocol

from ..helpers import TWISTD, free_port, origin, pattern, spawn, wait_port
from .revutil import rss_mb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

IDLE = 10_000
BATCH = 500


def raise_own_limit(need: int) -> None:
    """Soft RLIMIT_NOFILE → hard in this process; skip if the hard limit cannot hold ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}: cannot hold {IDLE} connections here")
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Idle(Protocol):
    """Sends one request, reads its whole answer ("idle ok"), then sits idle; ``again()`` asks once more."""

    def __init__(self, pool: "IdlePool") -> None:
        self.pool = pool
        self.buf = b""
        self.answers = 0
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n")

    def again(self) -> None:
        self.transport.write(b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.buf.endswith(b"\r\n\r\nidle ok"):
            assert self.buf.startswith(b"HTTP/1.1 200 "), self.buf[:80]
            self.buf = b""
            self.answers += 1
            self.pool.answered()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if not self.pool.closing:
            self.pool.gone()


class IdlePool(ClientFactory):
    """Many :class:`Idle` connections; ``wait(n)`` fires once ``n`` answers came in total
    (and fails at once if a connection is lost or cannot be made)."""

    noisy = False

    def __init__(self) -> None:
        self.conns: list[Idle] = []
        self.total = 0
        self.lost = 0
        self.closing = False
        self._want: Optional[tuple[int, defer.Deferred[None]]] = None

    def buildProtocol(self, addr: Any) -> Idle:
        p = Idle(self)
        self.conns.append(p)
        return p

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self._fail(reason.value)

    def answered(self) -> None:
        self.total += 1
        if self._want is not None and self.total >= self._want[0]:
            d, self._want = self._want[1], None
            d.callback(None)

    def gone(self) -> None:
        self.lost += 1
        self._fail(AssertionError(f"an idle connection was closed ({self.lost} so far)"))

    def _fail(self, exc: BaseException) -> None:
        if self._want is not None:
            d, self._want = self._want[1], None
            d.errback(exc)

    def wait(self, n: int, seconds: float = 30.0) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.total >= n:
            d.callback(None)
            return d
        self._want = (n, d)
        return d.addTimeout(seconds, reactor)


class KeepAlive(Protocol):
    """A sequential keep-alive client: ``get(path)`` → (status, body), Content-Length framed."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiting: Optional[defer.Deferred[tuple[int, bytes]]] = None

    def get(self, path: str) -> defer.Deferred[tuple[int, bytes]]:
        self.waiting = defer.Deferred()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: busy\r\n\r\n".encode())
        return self.waiting.addTimeout(10, reactor)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep or self.waiting is None:
            return
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        if len(rest) >= length:
            self.buf = rest[length:]
            d, self.waiting = self.waiting, None
            d.callback((int(head.split(b" ", 2)[1]), rest[:length]))


async def busy_client(port: int, rounds: int) -> int:
    """``rounds`` requests on one keep-alive connection, proxied and static in turn; all checked."""
    c = KeepAlive()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), c)
    try:
        for i in range(rounds):
            n = 1000 + 997 * i
            status, body = await c.get(f"/blob?n={n}")
            assert status == 200 and body == pattern(n), (status, len(body), n)
            status, body = await c.get("/idle")
            assert (status, body) == (200, b"idle ok")
    finally:
        c.transport.loseConnection()
    return rounds * 2


def report(request: Any, text: str) -> None:
    """A line for the "measured" section at the end of the test run (see conftest.py)."""
    request.node.user_properties.append(("measured", text))


@pytest_twisted.ensureDeferred
async def test_ten_thousand_idle_keepalive_connections_while_serving(tmp_path: Path, request: Any) -> None:
    """A twistd reverse proxy started with a 1024 soft fd limit (it raises its own) holds 10,000 idle
    keep-alive connections (each served one request), answers 400 checked requests on other
    connections meanwhile, and every idle connection still answers afterwards; RSS per idle
    connection is reported."""
    raise_own_limit(IDLE + 500)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    web = origin()
    port = free_port()
    conf = tmp_path / "idle.toml"
    conf.write_text(textwrap.dedent(f"""\
        disable_control = true
        [http]
        client_keepalive_timeout = "300s"
        [[http.server]]
        bind_addr = "127.0.0.1:{port}"
        [[http.server.location]]
        rule = "/idle"
        static_response = "idle ok"
        [[http.server.location]]
        proxy_url = "http://127.0.0.1:{web.getHost().port}"
        """))
    argv = [TWISTD, "-n", "--pidfile=", "wmproxy", "-c", str(conf)]
    prlimit = shutil.which("prlimit")
    if prlimit is not None and hard != resource.RLIM_INFINITY:
        argv = [prlimit, f"--nofile=1024:{hard}", *argv]  # the proxy must raise its own soft limit
    proc = spawn(argv, cwd=tmp_path)
    pool = IdlePool()
    try:
        await wait_port(port)
        assert await busy_client(port, 25) == 50  # warm-up: pool, caches, first allocations
        before = rss_mb(proc.pid)
        for start in range(0, IDLE, BATCH):
            for _ in range(BATCH):
                reactor.connectTCP("127.0.0.1", port, pool, timeout=10)
            await pool.wait(start + BATCH)
        assert len(pool.conns) == IDLE and not any(c.lost for c in pool.conns)
        held = rss_mb(proc.pid)

        served = await defer.gatherResults([defer.ensureDeferred(busy_client(port, 20)) for _ in range(10)])
        assert sum(served) == 400
        assert not any(c.lost for c in pool.conns)  # nobody was dropped meanwhile

        for c in pool.conns:  # every idle connection is still a live HTTP connection
            c.again()
        await pool.wait(2 * IDLE)
        assert all(c.answers == 2 for c in pool.conns)
        per_conn_kib = (held - before) * 1024 / IDLE
        report(request, f"[10k idle] proxy RSS {before:.1f} MiB → {held:.1f} MiB with {IDLE} idle keep-alive "
                        f"connections: {per_conn_kib:.1f} KiB per idle connection")
        assert per_conn_kib < 64  # generous bound: a leak per connection would show far above this
    finally:
        pool.closing = True
        for c in pool.conns:
            if c.transport is not None:
                c.transport.abortConnection()
        code = await proc.stop(30)
        await defer.maybeDeferred(web.stopListening)
    assert code == 0, proc.err[-2000:]
    assert b"Traceback" not in proc.err + proc.out
    assert b"open-files limit raised" in proc.out + proc.err or prlimit is None
