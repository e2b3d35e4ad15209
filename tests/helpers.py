"""Test helpers: in-process proxy, origin servers, async subprocesses."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.web import resource, server

from wmproxy_tw.config import load_text
from wmproxy_tw.service import ProxyService

ENV = dict(os.environ, NO_PROXY="", no_proxy="", http_proxy="", https_proxy="", all_proxy="",
           HTTP_PROXY="", HTTPS_PROXY="", ALL_PROXY="")


async def start_proxy(text: str) -> ProxyService:
    """Start a ProxyService from config text in this reactor (listeners on port 0)."""
    svc = ProxyService(reactor, load_text(text, "test.toml"))
    svc.bind_all()
    svc.startService()
    return svc


def free_port() -> int:
    """A loopback port free right now (for programs that must be told their port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
