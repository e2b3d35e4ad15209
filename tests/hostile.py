"""The hostile-client harness (issue 9, SPEC §10/§12).

One wmproxy-tw instance, run as ``twistd -n wmproxy`` (a subprocess, so its RSS can be read from
/proc), with every listener: a reverse proxy to an origin, a file server, the forward proxy (HTTP
and SOCKS5 on one port), a stream TCP relay, ws2tcp and tcp2ws, and a tunnel server (center_addr
with an in-process tunnel client mapping ``t.test`` to the origin, map_http_bind).  Beside it,
nginx and HAProxy reverse-proxy their own copy of the origin, for the HTTP cases where they are
the reference.

:data:`CASES` is the table of hostile inputs; :func:`run_case` plays one against ours (and, for
HTTP cases, against nginx and HAProxy at the same time) and returns each server's answer as a short
text (``400``, ``close``, ``ws close 1002``, ``05ff close``...).  :func:`probe` is the well-behaved
client of each listener.  Used by ``tests/integration/test_hostile.py`` (which asserts) and by
``python -m tests.hostile_table`` (which prints the Markdown comparison table).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

from .integration.test_stream import HalfCloseEcho
from .helpers import Running, deferLater, free_port, raw_connect, run_twistd, spawn, start_proxy, wait_port

HEAD_DEADLINE = 1.0
"""The header / handshake deadline every server of the stack is given (slow-loris answers by then)."""
BOUND = 5.0
"""No hostile case may take longer than this to be answered or closed (slow ones included)."""
BIG_FILE = 32 * 1024 * 1024
BIG_RESPONSE = 256 * 1024 * 1024
WS_LIMIT = 64 * 1024


# ------------------------------------------------------------------ origin


@dataclass
class Seen:
    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]


class OriginResource(resource.Resource):
    """``origin METHOD URI`` for everything; GET /big?n=N streams N bytes with a push producer
    (``produced[tag]`` counts what was written for ``&tag=``, so a paused origin shows); POST answers
    the body length.
    Every request it sees is recorded in ``seen``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.produced: dict[bytes, int] = {}

    def render(self, request: server.Request) -> Any:
        headers = [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        self.seen.append(Seen(request.method, request.uri, headers))
        request.setHeader(b"content-type", b"text/plain")
        if request.path == b"/big":
            n = int(request.args.get(b"n", [b"0"])[0])
            request.setHeader(b"content-length", str(n).encode())
            _Pump(self, request, n, request.args.get(b"tag", [b""])[0])
            return server.NOT_DONE_YET
        if request.method == b"POST":
            return b"origin got %d bytes\n" % len(request.content.read())
        return b"origin " + request.method + b" " + request.uri + b"\n"

    def smuggled(self) -> bool:
        return any(b"smuggled" in s.uri for s in self.seen)

    def injected(self) -> bool:
        return any(k.lower() == b"injected" for s in self.seen for k, _v in s.headers)


class _Producer:
    """A streaming producer writing in ``_pump`` until paused (or ``done``)."""

    paused = False

    def _pump(self) -> None:
        raise NotImplementedError

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.paused = True


class _Pump(_Producer):
    """Writes a big body while the client connection is writable."""

    CHUNK = b"x" * 65536

    def __init__(self, res: OriginResource, request: server.Request, n: int, tag: bytes) -> None:
        self.res, self.request, self.left, self.tag = res, request, n, tag
        self.gone = False
        request.notifyFinish().addBoth(self._gone)
        request.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _gone(self, _: Any) -> None:
        self.gone = True

    def _pump(self) -> None:
        while not (self.paused or self.gone) and self.left > 0:
            piece = self.CHUNK[: min(self.left, len(self.CHUNK))]
            self.left -= len(piece)
            self.res.produced[self.tag] = self.res.produced.get(self.tag, 0) + len(piece)
            self.request.write(piece)
        if self.left == 0 and not self.gone:
            self.gone = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.gone = True


class _Echo(HalfCloseEcho):
    """test_stream's half-closing echo, with back-pressure: its own transport is its producer, so
    a full write buffer stops its reading (helpers' echo buffers without end and drops at EOF)."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)


def _echo_server() -> Any:
    f = Factory.forProtocol(_Echo)
    f.noisy = False
    return reactor.listenTCP(0, f, interface="127.0.0.1")


class Origin:
    def __init__(self) -> None:
        self.res = OriginResource()
        site = server.Site(self.res)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    def reset(self) -> None:
        self.res.seen.clear()
        self.res.produced.clear()


# ------------------------------------------------------------------ the servers


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


OURS_CONF = """\
disable_control = true
default_level = "info"
shutdown_timeout = "1s"

[proxy]
bind = "127.0.0.1:{forward}"
header_timeout = "{deadline}s"
center_addr = "127.0.0.1:{center}"
map_http_bind = "127.0.0.1:{tunnel_http}"
tokens = ["hostile-token"]
heartbeat_interval = "0.4s"
heartbeat_timeout = "{deadline}s"

[http]
client_header_timeout = "{deadline}s"
[[http.server]]
bind_addr = "127.0.0.1:{reverse}"
[[http.server.location]]
proxy_url = "http://127.0.0.1:{origin}"
[[http.server]]
bind_addr = "127.0.0.1:{files}"
[[http.server.location]]
file_server = {{ root = "{root}" }}

[stream]
[[stream.server]]
bind_addr = "127.0.0.1:{stream}"
proxy_url = "tcp://127.0.0.1:{echo}"
[[stream.server]]
bind_addr = "127.0.0.1:{ws2tcp}"
bind_mode = "ws2tcp"
proxy_url = "tcp://127.0.0.1:{echo}"
max_message_size = "{ws_limit}"
open_handshake_timeout = "{deadline}s"
[[stream.server]]
bind_addr = "127.0.0.1:{tcp2ws}"
bind_mode = "tcp2ws"
proxy_url = "ws://127.0.0.1:{ws2tcp}/"
"""

NGINX_SERVER = ("client_header_timeout {deadline}s; location / {{ proxy_pass http://127.0.0.1:{origin}; "
                "proxy_http_version 1.1; proxy_set_header Connection \"\"; }}")

HAPROXY_CONF = """\
global
  maxconn 1000
defaults
  mode http
  timeout connect 2s
  timeout client 10s
  timeout server 10s
  timeout http-request {deadline}s
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server origin 127.0.0.1:{origin}
"""


class Stack:
    """Every server of the suite; ``ports`` maps a listener name to its port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: dict[str, int] = {}
        self.origins: dict[str, Origin] = {}
        self.procs: dict[str, Running] = {}
        self.things: list[Any] = []
        self.client_svc: Any = None

    @property
    def pid(self) -> int:
        return self.procs["ours"].pid

    def log(self) -> bytes:
        p = self.procs["ours"]
        return p.out + p.err

    async def start(self, peers: bool = True) -> "Stack":
        self.origins = {name: Origin() for name in ("ours", "nginx", "haproxy")}
        echo = _echo_server()
        self.things = [o.port for o in self.origins.values()] + [echo]
        root = self.tmp / "www"
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text("hostile index\n")
        with open(root / "big.bin", "wb") as f:
            f.truncate(BIG_FILE)
        for name in ("forward", "center", "tunnel_http", "reverse", "files", "stream", "ws2tcp", "tcp2ws"):
            self.ports[name] = free_port()
        conf = self.tmp / "ours.toml"
        conf.write_text(OURS_CONF.format(origin=self.origins["ours"].number, echo=echo.getHost().port,
                                         root=root, deadline=HEAD_DEADLINE, ws_limit=WS_LIMIT, **self.ports))
        self.procs["ours"] = run_twistd(conf)
        if peers:
            await self._start_peers()
        for port in self.ports.values():
            await wait_port(port)
        self.client_svc = await start_proxy(textwrap.dedent(f"""\
            [proxy]
            server = "127.0.0.1:{self.ports["center"]}"
            token = "hostile-token"
            heartbeat_interval = "0.4s"
            heartbeat_timeout = "{HEAD_DEADLINE}s"
            [[proxy.mappings]]
            name = "web"
            mode = "http"
            domain = "t.test"
            local_addr = "127.0.0.1:{self.origins["ours"].number}"
            """))
        for _ in range(200):
            if (await _tunnel_probe(self.ports["tunnel_http"])) == 200:
                break
            await deferLater(0.05)
        return self

    async def _start_peers(self) -> None:
        from .integration.revutil import Nginx

        if os.path.exists("/usr/sbin/nginx"):
            ngx = await Nginx(self.tmp, [NGINX_SERVER.format(deadline=int(HEAD_DEADLINE),
                                                             origin=self.origins["nginx"].number)]).start()
            assert ngx.proc is not None
            self.procs["nginx"] = ngx.proc
            self.ports["nginx"] = ngx.ports[0]
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if os.path.exists(haproxy):
            port = free_port()
            cfg = self.tmp / "haproxy.cfg"
            cfg.write_text(HAPROXY_CONF.format(deadline=int(HEAD_DEADLINE), port=port,
                                               origin=self.origins["haproxy"].number))
            self.procs["haproxy"] = spawn([haproxy, "-db", "-f", str(cfg)])
            self.ports["haproxy"] = port

    async def stop(self) -> None:
        if self.client_svc is not None:
            await defer.maybeDeferred(self.client_svc.stopService)
        for proc in self.procs.values():
            await proc.stop()
        for t in self.things:
            await defer.maybeDeferred(t.stopListening)


# ------------------------------------------------------------------ raw clients


@dataclass
class Outcome:
    data: bytes = b""
    end: str = "open"  # open | closed | reset
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Client(Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.end = "open"
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reading = True

    def dataReceived(self, data: bytes) -> None:
        if len(self.buf) < 1 << 20:
            self.buf += data

    def connectionLost(self, reason: Any = None) -> None:
        from twisted.internet import error

        self.end = "closed" if reason is None or reason.check(error.ConnectionDone) else "reset"
        self.lost.callback(None)


async def _connect(port: int) -> _Client:
    c = _Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), c)
    return c


def _reset(c: _Client) -> None:
    """Close with an RST (SO_LINGER 0), as a client that crashes mid-transfer."""
    sock = c.transport.getHandle()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.transport.abortConnection()


async def _finish(c: _Client, start: float, bound: float, until: Optional[Callable[[bytes], bool]] = None) -> Outcome:
    """Wait for the close (or ``until(data)``) within ``bound`` seconds of ``start``."""
    while c.end == "open" and reactor.seconds() - start < bound:
        if until is not None and until(bytes(c.buf)):
            break
        await deferLater(0.02)
    out = Outcome(bytes(c.buf), c.end, reactor.seconds() - start)
    if c.end == "open":
        c.transport.abortConnection()
        await c.lost
    return out


async def exchange(port: int, data: bytes | list[bytes], *, interval: float = 0.0, shut: bool = False,
                   bound: float = BOUND, until: Optional[Callable[[bytes], bool]] = None) -> Outcome:
    """Send ``data`` (pieces ``interval`` seconds apart, stopping once the server closes), optionally
    half-close, then collect until the server closes, ``until(data)`` holds or ``bound`` passes."""
    start = reactor.seconds()
    c = await _connect(port)
    pieces = data if isinstance(data, list) else [data]
    for i, piece in enumerate(pieces):
        if c.end != "open" or reactor.seconds() - start > bound:
            break
        c.transport.write(piece)
        if interval and i < len(pieces) - 1:
            await deferLater(interval)
    if shut and c.end == "open":
        c.transport.loseWriteConnection()
    return await _finish(c, start, bound, until)


async def ws_abuse(port: int, frames: bytes, bound: float = 3.0) -> Outcome:
    """Open a WebSocket, send ``frames`` once the 101 came; answer the server's close frame with
    ours (as RFC 6455 clients do) and wait for the server to close the TCP connection."""
    start = reactor.seconds()
    c = await _connect(port)
    c.transport.write(ws_handshake())
    while c.end == "open" and b"\r\n\r\n" not in c.buf and reactor.seconds() - start < bound:
        await deferLater(0.01)
    c.transport.write(frames)
    replied = False
    while c.end == "open" and reactor.seconds() - start < bound:
        if not replied and ws_close_code(bytes(c.buf)) is not None:
            replied = True
            c.transport.write(ws_frame(8, struct.pack("!H", 1000)))
        await deferLater(0.02)
    return await _finish(c, start, bound)


async def reset_after(port: int, data: bytes, *, read_bytes: int = 0, bound: float = BOUND) -> Outcome:
    """Send ``data``, wait until ``read_bytes`` came back (or a short while), then RST."""
    start = reactor.seconds()
    c = await _connect(port)
    c.transport.write(data)
    while c.end == "open" and len(c.buf) < read_bytes and reactor.seconds() - start < bound:
        await deferLater(0.02)
    if not read_bytes:
        await deferLater(0.2)
    out = Outcome(bytes(c.buf[:200]), "reset by us" if c.end == "open" else c.end, reactor.seconds() - start)
    if c.end == "open":
        _reset(c)
        await c.lost
    return out


class _Flood(_Client, _Producer):
    """Writes as fast as the connection takes it (a streaming producer) and reads nothing."""

    def __init__(self, prefix: bytes, chunk: bytes, wait_head: bool) -> None:
        super().__init__()
        self.prefix, self.chunk, self.wait_head = prefix, chunk, wait_head
        self.sent = 0

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.registerProducer(self, True)
        self.transport.write(self.prefix)
        if not self.wait_head:
            self._start()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.wait_head and b"\r\n\r\n" in self.buf:  # the 101 came: flood from now on
            self.wait_head = False
            self._start()

    def _start(self) -> None:
        self.transport.pauseProducing()  # never read again
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and self.end == "open" and self.sent < 1 << 30:
            self.sent += len(self.chunk)
            self.transport.write(self.chunk)


async def flood(port: int, prefix: bytes, chunk: bytes, pid: int) -> Outcome:
    """Send without end and never read what comes back (an echo or a relay to one): where the
    sender is stopped (see :func:`settled`), and our RSS growth."""
    start = reactor.seconds()
    c = _Flood(prefix, chunk, wait_head=prefix.startswith(b"GET "))
    rss0 = rss_kb(pid)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), c)
    total, stopped = await settled(lambda: c.sent)
    out = Outcome(b"", c.end, reactor.seconds() - start,
                  {"total": total, "stopped": stopped, "rss_growth_kb": rss_kb(pid) - rss0, "flood": True})
    if c.end == "open":
        _reset(c)
        await c.lost
    return out


async def settled(count: Callable[[], int], quiet: float = 0.5, limit: float = 4.0) -> tuple[int, bool]:
    """Wait until ``count()`` stops growing for ``quiet`` seconds (True), or ``limit`` passes
    (False: still growing): the value then.  Buffers fill at the machine's pace, so a stop is
    judged by a quiet spell, not at a fixed time."""
    start = reactor.seconds()
    value, since = count(), start
    while reactor.seconds() - start < limit:
        await deferLater(0.1)
        now = count()
        if now != value:
            value, since = now, reactor.seconds()
        elif value and reactor.seconds() - since >= quiet:
            return value, True
    return value, False


async def slow_read(port: int, request: bytes, origin: Optional[OriginResource], pid: Optional[int],
                    tag: bytes = b"") -> Outcome:
    """Ask for a big response (``&tag=tag``) and never read it: where the origin is stopped (see
    :func:`settled`), and our RSS growth."""
    start = reactor.seconds()
    c = await _connect(port)
    c.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.transport.pauseProducing()
    rss0 = rss_kb(pid) if pid else 0
    c.transport.write(request)
    if origin is not None:
        total, stopped = await settled(lambda: origin.produced.get(tag, 0))
    else:
        await deferLater(1.0)
        total, stopped = 0, True
    extra: dict[str, Any] = {"total": total, "stopped": stopped}
    if pid:
        extra["rss_growth_kb"] = rss_kb(pid) - rss0
    out = Outcome(b"", c.end, reactor.seconds() - start, extra)
    _reset(c)
    await c.lost
    return out


# ------------------------------------------------------------------ WebSocket frames


def ws_handshake(path: str = "/") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0,
             length: Optional[int] = None) -> bytes:
    """One RFC 6455 frame, correct unless told otherwise (``length`` may lie)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    m = 0x80 if masked else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 1 << 16:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_close_code(data: bytes) -> Optional[int]:
    """The close code of the server's first close frame after the 101 head, if any."""
    if b"\r\n\r\n" not in data:
        return None
    frames = data.split(b"\r\n\r\n", 1)[1]
    i = 0
    while i + 2 <= len(frames):
        op, n = frames[i] & 0x0F, frames[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n, j = struct.unpack("!H", frames[j:j + 2])[0], j + 2
        elif n == 127:
            n, j = struct.unpack("!Q", frames[j:j + 8])[0], j + 8
        if op == 8:
            return struct.unpack("!H", frames[j:j + 2])[0] if n >= 2 else 1005
        i = j + n
    return None


# ------------------------------------------------------------------ answers


_STATUS = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")


def answer(kind: str, out: Outcome) -> str:
    """A short, comparable text for what a server did."""
    if kind == "slowread":
        x = out.extra
        rss = f", RSS +{x['rss_growth_kb'] >> 10} MiB" if "rss_growth_kb" in x else ""
        if x.get("file"):
            return "file not read ahead" + rss
        if x.get("flood"):
            if out.end != "open":
                return f"{_ending(out)} after {x['total'] >> 10} KiB"
            return f"sender {'paused' if x['stopped'] else 'NOT paused'} at {x['total'] >> 20} MiB" + rss
        if x["total"] >= BIG_RESPONSE:
            return f"origin not paused: all {BIG_RESPONSE >> 20} MiB taken" + rss
        return f"origin {'paused' if x['stopped'] else 'NOT paused'} at {x['total'] >> 20} MiB" + rss
    if kind == "tunnel":
        from wmproxy_tw.tunnel.frames import FrameDecoder

        try:
            frames = FrameDecoder().feed(out.data)
        except Exception as e:  # noqa: BLE001 - shown in the table, asserted by the case
            return f"undecodable reply ({e})"
        names = ", ".join(type(f).__name__ for f in frames)
        if not names:
            return _ending(out)
        return f"{names}, {_ending(out)}" if out.end != "open" else f"{names} (open)"
    if kind == "ws":
        code = ws_close_code(out.data)
        head = out.data.split(b"\r\n", 1)[0]
        if code is not None:
            return f"ws close {code}" + ("" if out.end != "open" else " (open)")
        if b" 101 " in head:
            return "101 then " + {"closed": "close", "reset": "reset"}.get(out.end, "open")
        if head.startswith(b"HTTP/"):
            return head.split()[1].decode() + ("" if out.end != "open" else " (open)")
        return _ending(out)
    if kind == "socks" and not out.data.startswith(b"HTTP/"):
        if out.data:  # the greeting's reply, then the request's reply (version, code)
            replies = out.data[:2].hex() + (" " + out.data[2:4].hex() if len(out.data) >= 4 else "")
            return replies + (" close" if out.end != "open" else " (open)")
        return _ending(out)
    if kind == "echo":
        return f"echoed {len(out.data)} B" + (", close" if out.end != "open" else "")
    statuses = [m.decode() for m in _STATUS.findall(out.data[:4096])]
    if statuses:
        return "+".join(statuses) + (" (kept open)" if out.end == "open" else (" close" if kind == "socks" else ""))
    if out.data[:1] == b"\x05":
        return out.data[:2].hex() + (" close" if out.end != "open" else " (open)")
    if out.data:
        return f"{len(out.data)} B non-HTTP" + ("" if out.end != "open" else " (open)")
    return _ending(out)


def _ending(out: Outcome) -> str:
    return {"closed": "close", "reset": "reset", "reset by us": "no answer (we reset)"}.get(
        out.end, f"no answer in {out.elapsed:.0f}s")


# ------------------------------------------------------------------ probes (the well-behaved client)


async def _tunnel_probe(port: int) -> int:
    out = await exchange(port, b"GET /probe HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n", bound=3)
    m = _STATUS.search(out.data)
    return int(m.group(1)) if m else 0


async def _http_probe(port: int, request: bytes, needle: bytes) -> None:
    out = await exchange(port, request, bound=5)
    assert out.data.startswith(b"HTTP/1.1 200") and needle in out.data, out.data[:300]


async def _echo_probe(port: int, prefix: bytes = b"", skip: bytes = b"") -> None:
    c = await raw_connect(port)
    c.transport.write(prefix + b"probe-ping")  # type: ignore[union-attr]
    if skip:
        await c.wait_for(skip, 5)
    await c.wait_for(b"probe-ping", 5)
    c.transport.loseConnection()  # type: ignore[union-attr]
    await c.closed


async def probe(stack: Stack, listener: str) -> None:
    """A well-behaved client of ``listener`` is served (fails the test otherwise)."""
    p = stack.ports[listener]
    echo_port = stack.things[-1].getHost().port
    if listener == "reverse":
        await _http_probe(p, b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"origin GET /probe")
    elif listener == "files":
        await _http_probe(p, b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"hostile index")
    elif listener == "forward":
        o = stack.origins["ours"].number
        await _http_probe(p, f"GET http://127.0.0.1:{o}/fwd HTTP/1.1\r\nHost: 127.0.0.1:{o}\r\n"
                             "Connection: close\r\n\r\n".encode(), b"origin GET /fwd")
        await _echo_probe(p, b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", echo_port),
                          skip=b"\x05\x00\x05\x00")
    elif listener in ("stream", "tcp2ws"):
        await _echo_probe(p)
    elif listener == "ws2tcp":
        c = await raw_connect(p)
        c.transport.write(ws_handshake() + ws_frame(2, b"probe-ping"))  # type: ignore[union-attr]
        await c.wait_for(b"probe-ping", 5)
        c.transport.loseConnection()  # type: ignore[union-attr]
        await c.closed
    elif listener in ("center", "tunnel_http"):
        assert await _tunnel_probe(stack.ports["tunnel_http"]) == 200
    else:
        raise KeyError(listener)


LISTENERS = ("reverse", "files", "forward", "stream", "ws2tcp", "tcp2ws", "center", "tunnel_http")


async def probe_all(stack: Stack) -> None:
    await defer.gatherResults([defer.ensureDeferred(probe(stack, name)) for name in LISTENERS],
                              consumeErrors=True)


# ------------------------------------------------------------------ the cases


def _req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED


@dataclass(frozen=True)
class Case:
    """One hostile input.  ``target``: the listener; ``kind``: how its answer reads (http, ws,
    socks, echo, slowread); ``send(port, stack, server)`` plays it; ``expect``: our answer;
    ``peers``: run against nginx/HAProxy too (HTTP cases); ``match``: the peers whose status we
    claim to equal; ``note``: why we differ from the others (if we do)."""

    name: str
    target: str
    kind: str
    send: Callable[[int, Stack, str], Awaitable[Outcome]]
    expect: str | tuple[str, ...]
    peers: bool = False
    match: tuple[str, ...] = ()
    note: str = ""
    slow: bool = False
    rss: bool = False

    @property
    def family(self) -> str:
        """The test that plays this case (cases of a family share one pytest item)."""
        if self.slow:
            return "slow"
        for prefix, fam in (("ws:", "websocket frames"), ("socks:", "socks5 fields"), ("random", "random bytes")):
            if self.name.startswith(prefix):
                return fam
        if " via " in self.name:
            return "smuggling on the other HTTP listeners"
        return "reverse proxy vs nginx and HAProxy" if self.peers else "half-close and resets"

    @property
    def expected(self) -> tuple[str, ...]:
        return self.expect if isinstance(self.expect, tuple) else (self.expect,)


def raw(data: bytes | list[bytes], **kw: Any) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    async def play(port: int, stack: Stack, server: str) -> Outcome:
        return await exchange(port, data, **kw)
    return play


def _random(seed: int, n: int, prefix: bytes = b"") -> bytes:
    import random

    return prefix + random.Random(seed).randbytes(n)


def _at_least(n: int) -> Callable[[bytes], bool]:
    return lambda data: len(data) >= n


def _ws(*frames: bytes, bound: float = 3.0) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    async def play(port: int, stack: Stack, server: str) -> Outcome:
        return await ws_abuse(port, b"".join(frames), bound)
    return play


def _socks(data: bytes) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    return raw(data, bound=3)


async def _slow_read_reverse(port: int, stack: Stack, server: str) -> Outcome:
    return await slow_read(port, f"GET /big?n={BIG_RESPONSE}&tag=rev HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                           stack.origins[server].res, stack.pid if server == "ours" else None, b"rev")


async def _slow_read_files(port: int, stack: Stack, server: str) -> Outcome:
    out = await slow_read(port, b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n", None, stack.pid)
    out.extra["file"] = True
    return out


async def _slow_read_forward(port: int, stack: Stack, server: str) -> Outcome:
    o = stack.origins["ours"]
    return await slow_read(port, f"GET http://127.0.0.1:{o.number}/big?n={BIG_RESPONSE}&tag=fwd HTTP/1.1\r\n"
                                 f"Host: 127.0.0.1:{o.number}\r\n\r\n".encode(), o.res, stack.pid, b"fwd")


def _pipelined(n: int, size: int) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    """``n`` pipelined GETs of ``size`` bytes each, never read: the origin must stop producing
    (the proxy neither reads ahead without end nor buffers the answers)."""
    async def play(port: int, stack: Stack, server: str) -> Outcome:
        t, h = _target(stack, port)
        tag = f"pipe{port}"
        request = f"GET {t}/big?n={size}&tag={tag} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode() * n
        return await slow_read(port, request, stack.origins["ours"].res, stack.pid, tag.encode())
    return play


async def _slow_read_tunnel(port: int, stack: Stack, server: str) -> Outcome:
    o = stack.origins["ours"]
    return await slow_read(port, f"GET /big?n={BIG_RESPONSE}&tag=tun HTTP/1.1\r\nHost: t.test\r\n\r\n".encode(),
                           o.res, stack.pid, b"tun")


def _flood_on(kind: bytes) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    """Flood an echo: raw on the TCP relays; one endless binary frame on ws2tcp; through a SOCKS5
    CONNECT on the forward proxy."""
    async def play(port: int, stack: Stack, server: str) -> Outcome:
        prefix, chunk = b"", _Pump.CHUNK
        if kind == b"ws":
            prefix, chunk = ws_handshake(), ws_frame(2, b"x" * 32768)
        elif kind == b"socks":
            echo_port = stack.things[-1].getHost().port
            prefix = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", echo_port)
        return await flood(port, prefix, chunk, stack.pid)
    return play


def _target(stack: Stack, port: int) -> tuple[str, str]:
    """Request target and Host for an HTTP listener of ours (absolute-form on the forward proxy)."""
    o = stack.origins["ours"].number
    if port == stack.ports["forward"]:
        return f"http://127.0.0.1:{o}", f"127.0.0.1:{o}"
    return "", "t.test" if port == stack.ports["tunnel_http"] else "x"


async def _reset_upload(port: int, stack: Stack, server: str) -> Outcome:
    t, h = _target(stack, port)
    return await reset_after(port, f"POST {t}/upload HTTP/1.1\r\nHost: {h}\r\nContent-Length: 10000000\r\n\r\n"
                             .encode() + b"u" * 1_000_000)


async def _reset_download(port: int, stack: Stack, server: str) -> Outcome:
    t, h = _target(stack, port)
    return await reset_after(port, f"GET {t}/big?n={BIG_RESPONSE} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode(),
                             read_bytes=200_000)


async def _reset_download_files(port: int, stack: Stack, server: str) -> Outcome:
    return await reset_after(port, b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n", read_bytes=200_000)


async def _reset_relay(port: int, stack: Stack, server: str) -> Outcome:
    return await reset_after(port, b"r" * 200_000, read_bytes=100_000)


def _slowloris(data: bytes) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    """One byte every 0.1 s: never done before the header deadline."""
    return raw([data[i:i + 1] for i in range(len(data))], interval=0.1, bound=BOUND)


H11_CHUNK = ("h11 (forward proxy, tunnel HTTP) takes any chunk size and re-chunks what it forwards, "
             "so the upstream cannot desync; the connection waits for the data until the idle timeout")

SMUGGLE_ELSEWHERE = [
    ("CL + TE", "POST {t} HTTP/1.1\nHost: {h}\nContent-Length: 40\nTransfer-Encoding: chunked\n\n", CHUNKED_SMUGGLE),
    ("duplicate Content-Length", "POST {t} HTTP/1.1\nHost: {h}\nContent-Length: 4\nContent-Length: 45\n\n",
     b"abcd" + SMUGGLED),
    ("TE: \\x0bchunked", "POST {t} HTTP/1.1\nHost: {h}\nTransfer-Encoding: \x0bchunked\n\n", CHUNKED_SMUGGLE),
    ("chunk size 2^64", "POST {t} HTTP/1.1\nHost: {h}\nTransfer-Encoding: chunked\n\n",
     b"10000000000000000\r\nabc\r\n0\r\n\r\n"),
    ("bare CR in a header value", "GET {t} HTTP/1.1\nHost: {h}\nX-A: a\rInjected: yes\nConnection: close\n\n", b""),
]


def _elsewhere(head: str, body: bytes, bare_lf: bool = False) -> Callable[[int, Stack, str], Awaitable[Outcome]]:
    """A smuggling head aimed at the forward proxy (absolute-form), the file server or the
    tunnel's public HTTP listener (Host: t.test)."""
    async def play(port: int, stack: Stack, server: str) -> Outcome:
        o = stack.origins["ours"].number
        listener = next(k for k, v in stack.ports.items() if v == port)
        t, h = {"forward": (f"http://127.0.0.1:{o}/", f"127.0.0.1:{o}"), "files": ("/index.html", "x"),
                "tunnel_http": ("/", "t.test")}[listener]
        return await exchange(port, _req(head.format(t=t, h=h), body), bound=1.5)
    return play


CASES: list[Case] = [
    # -------------------------------------------------------------- request smuggling (reverse)
    Case("CL + TE: chunked (body smuggles a request)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nContent-Length: 40\nTransfer-Encoding: chunked\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("nginx",),
         note="RFC 9112 §6.1 lets a server take it as chunked and close after (HAProxy does); "
              "we refuse any framing ambiguity, like nginx"),
    Case("duplicate Content-Length, different values", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nContent-Length: 4\nContent-Length: 45\n\n", b"abcd" + SMUGGLED)),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("duplicate Content-Length, same value", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nContent-Length: 4\nContent-Length: 4\nConnection: close\n\n", b"abcd")),
         "200", peers=True, match=("haproxy",),
         note="RFC 9110 §8.6 lets a recipient accept identical values as one; we and HAProxy do, nginx refuses"),
    Case("Content-Length: +4", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nContent-Length: +4\n\n", b"abcd")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("Content-Length: 99999999999999999999", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nContent-Length: 99999999999999999999\n\n", b"abcd")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("TE: chunked + TE: x (two headers)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nTransfer-Encoding: x\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("TE: \\x0bchunked (vertical tab)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: \x0bchunked\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("haproxy",), note="nginx: 501 (unknown coding); we: 400 (ambiguous framing)"),
    Case("TE: xchunked", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: xchunked\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("haproxy",), note="nginx: 501 (unknown coding); we: 400 (ambiguous framing)"),
    Case("TE: chunked, identity", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked, identity\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("haproxy",), note="nginx: 501 (unknown coding); we: 400 (ambiguous framing)"),
    Case("Transfer-Encoding : chunked (space before colon)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding : chunked\nContent-Length: 40\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("nginx", "haproxy"), note="RFC 9112 §5.1: MUST 400"),
    Case("TE folded onto a continuation line (obs-fold)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding:\n chunked\nContent-Length: 40\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("nginx",), note="obs-fold refused (RFC 9112 §5.2 allows 400); HAProxy unfolds it"),
    Case("TE: chunked on HTTP/1.0", "reverse", "http",
         raw(_req("POST / HTTP/1.0\nHost: x\nTransfer-Encoding: chunked\n\n", CHUNKED_SMUGGLE)),
         "400", peers=True, match=("nginx",), note="RFC 9112 §6.1: TE in 1.0 is a framing fault; HAProxy accepts it"),
    Case("bare LF line endings, pipelined", "reverse", "http",
         raw(b"GET / HTTP/1.1\nHost: x\n\nGET /smuggled HTTP/1.1\nHost: x\n\n",
             until=lambda d: d.count(b"HTTP/1.1 ") >= 2),
         "400", peers=True,
         note="nginx and HAProxy accept bare LF (RFC 9112 §2.2 MAY); we refuse it: a front/back "
              "disagreement on line ends is a smuggling vector"),
    Case("bare CR inside a header value", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\nX-A: a\rInjected: yes\nConnection: close\n\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("chunk size 2^64 (overflow)", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n", b"10000000000000000\r\nabc\r\n0\r\n\r\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("chunk size -1", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n", b"-1\r\nabc\r\n0\r\n\r\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("chunk size 0x10", "reverse", "http",
         raw(_req("POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n", b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("missing Host (HTTP/1.1)", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nConnection: close\n\n")),
         "400", peers=True, match=("nginx",), note="RFC 9112 §3.2 MUST 400; HAProxy 2.6 forwards it"),
    Case("two Host headers", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: a\nHost: b\nConnection: close\n\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("HTTP/2.0 in an HTTP/1 request line", "reverse", "http",
         raw(_req("GET / HTTP/2.0\nHost: x\nConnection: close\n\n")),
         "505", peers=True, match=("nginx",), note="HAProxy 2.6 forwards it as HTTP/1.1"),
    Case("space in the request target", "reverse", "http",
         raw(_req("GET /a b HTTP/1.1\nHost: x\nConnection: close\n\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    # -------------------------------------------------------------- injection
    Case("%0d%0a in the path (CRLF injection)", "reverse", "http",
         raw(_req("GET /a%0d%0aInjected:%20yes HTTP/1.1\nHost: x\nConnection: close\n\n")),
         "200", peers=True, match=("nginx", "haproxy"),
         note="passed on encoded: the origin gets no extra header"),
    Case("NUL in a header value", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\nX-A: a\x00b\nConnection: close\n\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    Case("header name with a space", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\nX A: b\nConnection: close\n\n")),
         "400", peers=True, match=("nginx", "haproxy")),
    # -------------------------------------------------------------- sizes
    Case("1 MiB header line", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\nX-Big: ") + b"a" * (1 << 20) + b"\r\n\r\n"),
         "431", peers=True, rss=True,
         note="SPEC §10: 431 (RFC 6585); nginx: 400 'Request Header Or Cookie Too Large'; HAProxy: 400, or a "
              "reset when it closes while the client still sends"),
    Case("1 MiB request target", "reverse", "http",
         raw(b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
         "414", peers=True, match=("nginx",), rss=True, note="HAProxy: 400 or a reset, as above"),
    Case("10,000 headers", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\n") + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n"),
         "431", peers=True, rss=True, note="SPEC §10: 431; nginx and HAProxy answer 400"),
    Case("101 headers (count limit, small head)", "reverse", "http",
         raw(_req("GET / HTTP/1.1\nHost: x\nConnection: close\n") + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n"),
         "431", peers=True,
         note="SPEC §10 caps the count at 100; nginx has no count limit; HAProxy's is 101 (400)"),
    # -------------------------------------------------------------- slow clients, half-open, resets
    Case("slow-loris: 1 byte per 0.1 s", "reverse", "http",
         _slowloris(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"),
         "408", peers=True, match=("haproxy",), slow=True,
         note="nginx closes silently at client_header_timeout; we and HAProxy answer 408"),
    Case("slow-loris on the forward proxy", "forward", "http",
         _slowloris(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"),
         "408", slow=True),
    Case("slow-loris on the file server", "files", "http",
         _slowloris(b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"), "408", slow=True),
    Case("slow WebSocket handshake (ws2tcp)", "ws2tcp", "ws", _slowloris(ws_handshake() + b"X" * 100),
         ("close", "reset"), slow=True, note="open_handshake_timeout: autobahn aborts (a reset: the client still sends)"),
    Case("slow hello on center_addr", "center", "tunnel", _slowloris(b"\x01" * 200),
         ("Error, close", "Error, reset", "close", "reset"), slow=True),
    Case("idle connection, nothing sent (reverse)", "reverse", "http", raw(b""), "408", peers=True,
         match=("haproxy",), slow=True, note="nginx closes silently"),
    Case("slow reader of a 256 MiB response", "reverse", "slowread", _slow_read_reverse,
         "origin paused", peers=True, slow=True,
         note="nginx buffers the response to a temp file (proxy_buffering), so its origin is not paused"),
    Case("slow reader through the forward proxy", "forward", "slowread", _slow_read_forward, "origin paused", slow=True),
    Case("slow reader of a 32 MiB file", "files", "slowread", _slow_read_files, "file not read ahead", slow=True),
    Case("slow reader through the tunnel (map_http_bind)", "tunnel_http", "slowread", _slow_read_tunnel,
         "origin paused", slow=True),
    *[Case(f"200 pipelined GETs of 1 MiB, never read ({listener})", listener, "slowread", _pipelined(200, 1 << 20),
           "origin paused", slow=True) for listener in ("reverse", "forward", "tunnel_http")],
    *[Case(f"sender that never reads the echo ({listener})", listener, "slowread", _flood_on(prefix),
           "sender paused", slow=True)
      for listener, prefix in (("stream", b""), ("tcp2ws", b""), ("ws2tcp", b"ws"), ("forward", b"socks"))],
    Case("request then half-close (SHUT_WR)", "reverse", "http",
         raw(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n", shut=True), "200", peers=True, match=("haproxy",),
         note="a half-close is not an abort (RFC 9112 §9.6); nginx takes it as one and closes without answering"),
    Case("half-close before a full head", "reverse", "http",
         raw(b"GET /half HTTP/1.1\r\nHost:", shut=True), "close", peers=True, match=("nginx",),
         note="nothing to answer; HAProxy says 400"),
    Case("half-close on the stream relay", "stream", "echo", raw(b"half-closed", shut=True), "echoed 11 B, close"),
    Case("half-close on tcp2ws", "tcp2ws", "echo", raw(b"half-closed", shut=True),
         ("echoed 0 B, close", "echoed 11 B, close"),
         note="a WebSocket has no half-close: the client's FIN closes the bridge (SPEC §7); the echo in flight "
              "may be lost"),
    Case("ws2tcp: a frame, then FIN without a close frame", "ws2tcp", "ws",
         raw([ws_handshake(), ws_frame(2, b"abc")], interval=0.3, shut=True, bound=3), "101 then close",
         note="an abnormal closure (1006): the bridge closes the upstream at once"),
    Case("half-close on the forward proxy", "forward", "http",
         raw(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost:", shut=True), ("400", "close")),
    Case("reset mid-upload (1 of 10 MB sent)", "reverse", "http", _reset_upload, "no answer (we reset)", peers=True,
         note="nginx answers 413 at once: its default client_max_body_size is 1 MiB (ours 1 GiB)"),
    Case("reset mid-download (256 MiB response)", "reverse", "http", _reset_download, "200", peers=True, match=("nginx", "haproxy")),
    Case("reset mid-download (file server)", "files", "http", _reset_download_files, "200"),
    *[Case(f"reset mid-{what} via {listener}", listener, "http", play, expect)
      for listener in ("forward", "tunnel_http")
      for what, play, expect in (("upload", _reset_upload, "no answer (we reset)"), ("download", _reset_download, "200"))],
    Case("reset mid-stream (TCP relay)", "stream", "echo", _reset_relay, "echoed 200 B"),
    # -------------------------------------------------------------- WebSocket frame abuse (ws2tcp)
    Case("ws: unmasked client frame", "ws2tcp", "ws", _ws(ws_frame(2, b"x", masked=False)), "ws close 1002"),
    Case("ws: reserved opcode 0x3", "ws2tcp", "ws", _ws(ws_frame(3, b"x")), "ws close 1002"),
    Case("ws: reserved control opcode 0xB", "ws2tcp", "ws", _ws(ws_frame(0xB, b"x")), "ws close 1002"),
    Case("ws: RSV1 set without an extension", "ws2tcp", "ws", _ws(ws_frame(2, b"x", rsv=4)), "ws close 1002"),
    Case("ws: frame over max_message_size (64 KiB)", "ws2tcp", "ws", _ws(ws_frame(2, b"x" * 70_000)), "ws close 1009"),
    Case("ws: frame length 2^63-1 announced", "ws2tcp", "ws", _ws(ws_frame(2, b"", length=(1 << 63) - 1), bound=1.0),
         ("ws close 1009", "ws close 1002"),
         note="our close reply is read as payload of the announced frame: closed at the 5 s close timeout"),
    Case("ws: fragmented ping (FIN=0)", "ws2tcp", "ws", _ws(ws_frame(9, b"p", fin=False)), "ws close 1002"),
    Case("ws: ping with 126-byte payload", "ws2tcp", "ws", _ws(ws_frame(9, b"p" * 126)), "ws close 1002"),
    Case("ws: continuation without a start", "ws2tcp", "ws", _ws(ws_frame(0, b"x")), "ws close 1002"),
    Case("ws: text with invalid UTF-8", "ws2tcp", "ws", _ws(ws_frame(1, b"\xff\xfe\xc3")), "ws close 1007"),
    Case("ws: close code 999", "ws2tcp", "ws", _ws(ws_frame(8, struct.pack("!H", 999))),
         ("ws close 1002", "101 then close", "101 then reset"), note="autobahn drops the TCP connection"),
    Case("ws: close with a 1-byte payload", "ws2tcp", "ws", _ws(ws_frame(8, b"x")),
         ("ws close 1002", "101 then close", "101 then reset"), note="autobahn drops the TCP connection"),
    Case("ws: handshake without Sec-WebSocket-Key", "ws2tcp", "ws",
         raw(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n", bound=3), "400"),
    # -------------------------------------------------------------- SOCKS5, every field wrong
    Case("socks: version 4 greeting", "forward", "socks", _socks(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"),
         "400 close", note="not 0x05, so taken for HTTP (SPEC §3 detection): 400"),
    Case("socks: nmethods 0", "forward", "socks", _socks(b"\x05\x00"), "05ff close"),
    Case("socks: nmethods 255, 1 method sent, then EOF", "forward", "socks",
         raw(b"\x05\xff\x00", shut=True, bound=3), "close"),
    Case("socks: only GSSAPI/user-pass offered (no auth configured)", "forward", "socks", _socks(b"\x05\x02\x01\x02"),
         "05ff close"),
    Case("socks: request version 4", "forward", "socks", _socks(b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
         "0500 close", note="no reply in a version we do not speak: a close"),
    Case("socks: cmd 0x09", "forward", "socks", _socks(b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50"),
         "0500 0507 close"),
    Case("socks: cmd BIND", "forward", "socks", _socks(b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50"),
         "0500 0507 close", note="BIND: command not supported (SPEC §3)"),
    Case("socks: atyp 0x05", "forward", "socks", _socks(b"\x05\x01\x00\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50"),
         "0500 0508 close"),
    Case("socks: domain length 0", "forward", "socks", _socks(b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50"),
         "0500 0501 close"),
    Case("socks: domain with NUL and spaces", "forward", "socks",
         _socks(b"\x05\x01\x00\x05\x01\x00\x03\x05a\x00b c\x00\x50"), "0500 0501 close"),
    Case("socks: port 0", "forward", "socks", _socks(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00"),
         "0500 0502 close", note="0x02: not allowed by ruleset"),
    Case("socks: RSV byte 0xff", "forward", "socks", _socks(b"\x05\x01\x00\x05\x01\xff\x01\x7f\x00\x00\x01\x00\x50"),
         "0500 0501 close"),
    Case("socks: truncated request then EOF", "forward", "socks", raw(b"\x05\x01\x00\x05\x01\x00\x01\x7f", shut=True,
                                                                        bound=3), "0500 close"),
    # -------------------------------------------------------------- smuggling on the other HTTP parsers
    *[Case(f"{what} via {listener}", listener, "http", _elsewhere(head, body),
           ("400", "no answer") if what.startswith("chunk size") and listener != "files" else ("400", "501"),
           note=H11_CHUNK if what.startswith("chunk size") and listener != "files" else "")
      for what, head, body in SMUGGLE_ELSEWHERE for listener in ("forward", "files", "tunnel_http")],
    # -------------------------------------------------------------- random bytes to every listener
    *[Case(f"random 64 KiB (seed {seed}) to {listener}", listener,
           {"stream": "echo", "tcp2ws": "echo", "ws2tcp": "ws", "center": "tunnel"}.get(listener, "http"),
           raw(_random(seed, 65536, prefix), bound=3,
               until=_at_least(65536 + len(prefix)) if listener in ("stream", "tcp2ws") else None),
           expect, rss=(seed == 1))
      for seed, prefix in ((1, b""), (2, b"\x05"), (3, b"GET "), (4, b"\x16\x03\x01"))
      for listener, expect in (("reverse", ("400", "close")), ("files", ("400", "close")),
                               ("forward", ("400", "close", "05ff close")),
                               ("stream", (f"echoed {65536 + len(prefix)} B",)),
                               ("tcp2ws", (f"echoed {65536 + len(prefix)} B",)),
                               ("ws2tcp", ("400", "431", "close")), ("center", ("Error, close",)),
                               ("tunnel_http", ("400", "close")))],
]


def case_by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


async def run_case(stack: Stack, case: Case) -> dict[str, str]:
    """Play ``case`` against ours (and the peers, at the same time, if it is a peer case); the answers."""
    servers = ["ours"] + ([s for s in ("nginx", "haproxy") if s in stack.ports] if case.peers else [])
    for s in servers:
        stack.origins[s].reset()

    async def one(s: str) -> str:
        port = stack.ports[case.target if s == "ours" else s]
        out = await case.send(port, stack, s)
        text = answer(case.kind, out)
        o = stack.origins[s].res
        if o.smuggled():
            text += " ⚠ /smuggled reached origin"
        if o.injected():
            text += " ⚠ header injected"
        return text

    results = await defer.gatherResults([defer.ensureDeferred(one(s)) for s in servers], consumeErrors=True)
    return dict(zip(servers, results, strict=True))


def matches(got: str, expected: str) -> bool:
    """``got`` is ``expected``, or starts with it followed by details ('400 (kept open)',
    'origin paused at 12 MiB', 'no answer in 3s')."""
    return got == expected or got.startswith(expected + " ") or got.startswith(expected + ",")


def status(text: str) -> str:
    return text.split()[0] if text else text
