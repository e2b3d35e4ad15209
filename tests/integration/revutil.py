"""Helpers for the reverse-proxy integration tests: named origins, raw clients, nginx, twistd."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web import resource, server

from ..helpers import TWISTD, Running, free_port, spawn, wait_port

__all__ = ["TWISTD", "free_port", "spawn", "wait_port"]  # re-exported for the reverse tests


class Named(resource.Resource):
    """An origin that says who it is: ``NAME METHOD URI``; /headers echoes the request
    head; /slow answers after ``slow`` seconds; /upload answers ``sha256 length`` of the body;
    /health is 200 unless ``sick``."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[tuple[bytes, bytes]] = []
        self.slow = 1.0
        self.sick = False

    def render(self, request: server.Request) -> Any:
        path = request.path
        if path != b"/health":
            self.seen.append((request.method, request.uri))
        request.setHeader(b"content-type", b"text/plain")
        if path == b"/health":
            request.setResponseCode(503 if self.sick else 200)
            return b"sick\n" if self.sick else b"ok\n"
        if path == b"/headers":
            return b"".join(k + b": " + v + b"\n" for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs)
        if path == b"/upload":
            h, n = hashlib.sha256(), 0
            request.content.seek(0)
            while True:
                block = request.content.read(1 << 20)
                if not block:
                    break
                h.update(block)
                n += len(block)
            return f"{h.hexdigest()} {n}\n".encode()
        if path == b"/slow":
            reactor.callLater(self.slow, _finish, request, f"{self.name} slow\n".encode())
            return server.NOT_DONE_YET
        return f"{self.name} {request.method.decode()} {request.uri.decode()}\n".encode()


def _finish(request: server.Request, body: bytes) -> None:
    if not request._disconnected:
        request.write(body)
        request.finish()


class Origin:
    """A named twisted.web origin on 127.0.0.1 that can be killed (listener and
    connections) and revived on the same port."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.res = Named(name)
        self.site = server.Site(self.res)
        self.site.noisy = False
        self.protocols: set[Any] = set()
        build = self.site.buildProtocol

        def tracked(addr: Any) -> Any:
            p = build(addr)
            self.protocols.add(p)
            lost = p.connectionLost

            def gone(reason: Any, _lost: Any = lost, _p: Any = p) -> None:
                self.protocols.discard(_p)
                _lost(reason)

            p.connectionLost = gone
            return p

        self.site.buildProtocol = tracked  # type: ignore[method-assign]
        self.listener = reactor.listenTCP(port, self.site, interface="127.0.0.1")
        self.port = self.listener.getHost().port

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def kill(self) -> None:
        await defer.maybeDeferred(self.listener.stopListening)
        for p in list(self.protocols):
            p._channel.transport.abortConnection()

    def revive(self) -> None:
        self.listener = reactor.listenTCP(self.port, self.site, interface="127.0.0.1")

    async def stop(self) -> None:
        await self.kill()


class RawClient(Protocol):
    """Writes bytes, collects everything until the server closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.got = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.got)


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection; return all bytes until the server closes
    (or, after ``timeout``, what came so far)."""
    proto = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    d = proto.done
    timer = reactor.callLater(timeout, lambda: proto.transport.loseConnection())
    got = await d
    if timer.active():
        timer.cancel()
    return got


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def write_blob(path: Path, size: int) -> str:
    """Write ``size`` deterministic bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    block = bytes(range(256)) * 4096
    left = size
    with open(path, "wb") as f:
        while left:
            piece = block[: min(left, len(block))]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Nginx:
    """nginx from the distribution as an origin: ``servers`` are config snippets for
    ``server { listen 127.0.0.1:PORT; ... }`` blocks, one port each."""

    def __init__(self, tmp: Path, bodies: list[str]) -> None:
        self.dir = tmp / "nginx"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in bodies]
        servers = "\n".join(f"  server {{ listen 127.0.0.1:{p}; {b} }}" for p, b in zip(self.ports, bodies, strict=True))
        user = "user root;" if os.geteuid() == 0 else ""  # workers must read files under a private tmp dir
        conf = f"""
{user}
worker_processes 1;
error_log {self.dir}/logs/error.log;
pid {self.dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/tmp;
  proxy_temp_path {self.dir}/tmp;
  keepalive_requests 100000;
{servers}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc: Optional[Running] = None

    async def start(self) -> "Nginx":
        self.proc = spawn(["/usr/sbin/nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir),
                           "-g", "daemon off;"])
        for p in self.ports:
            await wait_port(p)
        return self

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()


def have_nginx() -> bool:
    return os.path.exists("/usr/sbin/nginx")
