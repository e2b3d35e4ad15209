"""Test helpers: in-process proxy, origin servers, async subprocesses."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, error, reactor, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.web import resource, server
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from wmproxy_tw.config import load_text
from wmproxy_tw.service import ProxyService

ENV = dict(os.environ, NO_PROXY="", no_proxy="", http_proxy="", https_proxy="", all_proxy="",
           HTTP_PROXY="", HTTPS_PROXY="", ALL_PROXY="")


async def start_proxy(text: str, control: bool = False) -> ProxyService:
    """Start a ProxyService from config text in this reactor (listeners on port 0).

    The control API (127.0.0.1:8837 unless the text sets ``control``) is off
    unless ``control`` is True: tests must not fight over a fixed port.
    """
    svc = ProxyService(reactor, load_text(text, "test.toml"), control=control)
    svc.bind_all()
    svc.startService()
    return svc


def bound_port(svc: ProxyService, kind: str = "tcp", index: int = 0) -> int:
    listeners = [lst for (k, _a), lst in svc.registry.listeners.items() if k == kind]
    return listeners[index].bound.port


async def run(*argv: str, stdin: bytes | None = None) -> tuple[bytes, bytes, int]:
    """Run a program without blocking the reactor: (stdout, stderr, exit code)."""
    out, err, code = await utils.getProcessOutputAndValue(argv[0], argv[1:], env=ENV)
    return out, err, code


async def run_python(*args: str) -> tuple[bytes, bytes, int]:
    return await run(sys.executable, *args)


class Blob(resource.Resource):
    """GET /blob?n=N: N bytes of a deterministic pattern; POST /echo: the body back."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        path = request.path.decode()
        if path.startswith("/blob"):
            n = int(request.args.get(b"n", [b"1024"])[0])
            request.setHeader(b"content-type", b"application/octet-stream")
            return pattern(n)
        if path == "/headers":
            request.setHeader(b"content-type", b"text/plain")
            return b"".join(k + b": " + v + b"\n" for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs)
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from origin " + request.uri + b"\n"

    def render_POST(self, request: server.Request) -> bytes:
        return request.content.read()


def pattern(n: int) -> bytes:
    block = bytes(range(256)) * 256
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


def origin() -> Any:
    """An HTTP origin on 127.0.0.1:0; returns the listening port."""
    site = server.Site(Blob())
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def echo_server(interface: str = "127.0.0.1") -> Any:
    f = Factory.forProtocol(Echo)
    f.noisy = False
    return reactor.listenTCP(0, f, interface=interface)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class _Collect(ProcessProtocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", 1)
        self.done.callback((b"".join(self.out), b"".join(self.err), code))


async def run_input(argv: list[str], data: bytes) -> tuple[bytes, bytes, int]:
    """Run a program with ``data`` on its stdin, without blocking the reactor."""
    proto = _Collect(data)
    reactor.spawnProcess(proto, argv[0], argv, env=ENV)
    return await proto.done


# ------------------------------------------------------------------ twistd as an operator runs it

TWISTD = str(Path(sys.executable).with_name("twistd"))
WMPROXY = str(Path(sys.executable).with_name("wmproxy"))


def free_port() -> int:
    """A loopback port free right now (for programs that must be told their port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, seconds: float = 20.0, up: bool = True) -> None:
    """Wait until something listens on 127.0.0.1:port (or, ``up=False``, until nothing does)."""
    for _ in range(int(seconds * 20)):
        with socket.socket() as s:
            s.settimeout(0.5)
            if (s.connect_ex(("127.0.0.1", port)) == 0) == up:
                return
        await deferLater(0.05)
    raise AssertionError(f"port {port} still {'closed' if up else 'open'} after {seconds}s")


class Running(ProcessProtocol):
    """A child process: its output, and ``ended`` firing with the exit code (or minus the signal)."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.out = b""
        self.err = b""
        self.code: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        value = getattr(reason, "value", None)
        code = getattr(value, "exitCode", None)
        self.code = code if code is not None else -(getattr(value, "signal", 0) or 0)
        self.ended.callback(self.code)

    @property
    def pid(self) -> int:
        return int(self.transport.pid)  # type: ignore[union-attr]

    def signal(self, name: str) -> None:
        import signal

        try:
            self.transport.signalProcess(getattr(signal, "SIG" + name))  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    async def stop(self, seconds: float = 20.0) -> int:
        """SIGTERM unless it ended; wait (bounded) for the exit code."""
        if self.code is None:
            self.signal("TERM")
        return await self.ended.addTimeout(seconds, reactor)


def spawn(argv: list[str], cwd: Optional[Path] = None) -> Running:
    proc = Running()
    reactor.spawnProcess(proc, argv[0], argv, env=ENV, path=str(cwd) if cwd else None)
    return proc


def run_twistd(conf: Path, *extra: str) -> Running:
    """``twistd -n wmproxy -c conf`` in the foreground, in the config's folder."""
    return spawn([TWISTD, "-n", "--pidfile=", *extra, "wmproxy", "-c", str(conf)], cwd=conf.parent)


async def http_call(method: str, url: str, token: Optional[str] = None,
                    headers: Optional[dict[str, str]] = None, timeout: float = 15.0) -> tuple[int, bytes]:
    """One HTTP request without a proxy: (status, body)."""
    h = Headers({k: [v] for k, v in (headers or {}).items()})
    if token:
        h.addRawHeader("Authorization", f"Bearer {token}")
    resp = await Agent(reactor).request(method.encode(), url.encode(), h).addTimeout(timeout, reactor)
    body = _Body()
    resp.deliverBody(body)
    return resp.code, await body.done.addTimeout(timeout, reactor)


class _Body(Protocol):
    """Collects a response body (readBody warns about the Agent's own transport)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.parts))


class RawClient(Protocol):
    """A TCP client for tests: ``wait_for(bytes)`` and ``closed``."""

    def __init__(self) -> None:
        self.buf = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiting: Optional[tuple[bytes, defer.Deferred[bytes]]] = None

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        if self._waiting is not None and self._waiting[0] in self.buf:
            needle, d = self._waiting
            self._waiting = None
            end = self.buf.index(needle) + len(needle)
            got, self.buf = self.buf[:end], self.buf[end:]
            d.callback(got)

    def wait_for(self, needle: bytes, seconds: float = 10.0) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting = (needle, d)
        self._check()
        return d.addTimeout(seconds, reactor)

    def connectionLost(self, reason: Any = None) -> None:
        if self._waiting is not None:
            self._waiting[1].errback(reason)
            self._waiting = None
        self.closed.callback(None)


async def raw_connect(port: int) -> RawClient:
    proto = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
    return proto


async def connect_tunnel(proxy_port: int, target_port: int) -> RawClient:
    """A CONNECT tunnel through the forward proxy to 127.0.0.1:target_port."""
    c = await raw_connect(proxy_port)
    c.transport.write(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # type: ignore[union-attr]
    head = await c.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return c


# ------------------------------------------------------------------ a real redis-server (fleet tests)

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    """A ``redis-server`` of our own on 127.0.0.1:``port`` (never the system's 6379), no persistence.

    ``stop()``/``start()`` make an outage and end it, on the same port.
    """

    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.extra = list(extra)
        self.port = free_port()
        self.proc: Optional[Running] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it and wait for its port; its own words if it exits first (e.g. a port taken meanwhile)."""
        proc = self.proc = spawn([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(self.folder), "--loglevel", "warning",
                                  *self.extra])
        proc.ended.addErrback(lambda _f: None)
        for _ in range(500):
            if proc.code is not None:
                raise AssertionError(f"redis-server exited ({proc.code}) before listening on {self.port}: "
                                     f"{(proc.out + proc.err).decode(errors='replace')[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            await deferLater(0.02)
        raise AssertionError(f"redis-server not listening on {self.port} after 10s")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.code is None:
            await self.proc.stop(10.0)
            await wait_port(self.port, 10.0, up=False)
        self.proc = None


async def until(check: Any, seconds: float = 10.0) -> None:
    """Poll ``check()`` on the reactor every 20 ms until it is true (bounded)."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await deferLater(0.02)
    raise AssertionError(f"not true within {seconds}s: {check}")


def feature(svc: ProxyService, name: str) -> Any:
    """The running feature called ``name`` (``fleet``, ``reverse``...)."""
    return next(f for f in svc.features if f.name == name)
