"""A raw HTTP/1.1 client for tests: sends bytes exactly as given (encoded paths,
NULs, backslashes), reads to close, decodes chunked bodies."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class _Collect(Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(b"".join(self.chunks))


def _dechunk(body: bytes) -> bytes:
    out, i = [], 0
    while True:
        j = body.index(b"\r\n", i)
        n = int(body[i:j].split(b";")[0], 16)
        if n == 0:
            return b"".join(out)
        out.append(body[j + 2:j + 2 + n])
        i = j + 2 + n + 2


def parse(raw: bytes, head: bool = False) -> Response:
    head_end = raw.index(b"\r\n\r\n")
    lines = raw[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    body = raw[head_end + 4:]
    if head:
        body = b""
    elif "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        body = _dechunk(body)
    return Response(status, headers, body, raw)


async def send(port: int, data: bytes, head: bool = False, host: str = "127.0.0.1",
               source: str | None = None) -> Response:
    """Send ``data`` (a whole request, ideally with ``Connection: close``) and parse the answer;
    ``source`` binds the client socket (e.g. 127.0.0.2: another client address on loopback)."""
    ep = TCP4ClientEndpoint(reactor, host, port, bindAddress=(source, 0) if source else None)
    proto = await ep.connect(Factory.forProtocol(lambda: _Collect(data)))
    return parse(await proto.done, head)


async def get(port: int, path: bytes | str, headers: dict[str, str] | None = None,
              method: str = "GET", source: str | None = None) -> Response:
    """One request with ``Connection: close``; ``path`` goes on the wire as given."""
    if isinstance(path, str):
        path = path.encode("latin-1")
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}".encode("latin-1"))
    return await send(port, b"\r\n".join(lines) + b"\r\n\r\n", head=(method == "HEAD"), source=source)
