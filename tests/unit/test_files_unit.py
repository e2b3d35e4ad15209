"""file_server pieces without sockets: path splitting, the producer, exists(), try_paths,
limit_req as a pipeline step, rate_limit pacing of a file body (all on a Clock)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from wmproxy_tw.config.grammar import parse_rate
from wmproxy_tw.config.model import FileServer, LimitReq, parse_limit_req_zone
from wmproxy_tw.limits import LimitReqStep, RequestZone
from wmproxy_tw.reverse.files import (
    FileCache,
    FileHandler,
    FileSender,
    PathError,
    as_raw,
    split_path,
)
from wmproxy_tw.reverse.trypaths import TryPaths, TryPathsHandler

from ..filetree import make_tree


class FakeRequest:
    """Just enough of twisted.web's Request; registerProducer stores the producer like a transport."""

    def __init__(self, path: bytes, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None) -> None:
        self.path = path
        self.uri = path
        self.method = method
        self.requestHeaders = Headers({k: [v] for k, v in (headers or {}).items()})
        self.responseHeaders = Headers()
        self.code = 200
        self.body = b""
        self.finished = False
        self.producer: Any = None
        self.streaming: bool | None = None
        self.channel = type("Chan", (), {"transport": StringTransport()})()
        self._disconnected = False
        self._notify: list[defer.Deferred[None]] = []

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def header(self, name: bytes) -> bytes | None:
        v = self.responseHeaders.getRawHeaders(name)
        return v[0] if v else None

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.body += data

    def finish(self) -> None:
        assert not self.finished
        self.finished = True
        for d in self._notify:
            d.callback(None)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._notify.append(d)
        return d

    def pull_all(self, limit: int = 100000) -> None:
        """Act as the transport of a pull producer until it unregisters."""
        for _ in range(limit):
            if self.producer is None:
                return
            self.producer.resumeProducing()
        raise AssertionError("producer never finished")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.mark.parametrize("path,prefix,expected", [
    ("/a/b.txt", "", (["a", "b.txt"], False)),
    ("/a/./b/../c/", "", (["a", "c"], True)),
    ("/a%2Fb", "", (["a", "b"], False)),
    ("/%2e%2e%2fx", "/%2e", PathError(404, "")),
    ("/static/x", "/static", (["x"], False)),
    ("/static", "/static", ([], False)),
    ("/staticx/y", "/static", PathError(404, "")),
    ("/static/../x", "/static", PathError(400, "")),
    ("/caf%C3%A9", "", (["caf\u00e9"], False)),
    ("/%ff", "", (["\udcff"], False)),
    ("/a%00", "", PathError(400, "")),
    ("/a\\b", "", PathError(400, "")),
    ("/a%5cb", "", PathError(400, "")),
    ("a", "", PathError(400, "")),
    ("/..", "", PathError(400, "")),
])
def test_split_path(path: str, prefix: str, expected: Any) -> None:
    """Paths are decoded once, dot segments resolved, climbing above root/prefix refused."""
    if isinstance(expected, PathError):
        with pytest.raises(PathError) as e:
            split_path(path, prefix)
        assert e.value.status == expected.status
    else:
        assert split_path(path, prefix) == expected


def test_decoded_paths_are_not_decoded_twice() -> None:
    """A decoded try_paths candidate keeps a literal '%': '/100%41' stays '100%41'."""
    assert split_path(as_raw("/100%41", encoded=False)) == (["100%41"], False)
    assert split_path(as_raw("/a b\u00e9".encode().decode("latin-1"), encoded=False)) == (["a b\u00e9"], False)
    with pytest.raises(PathError):
        split_path(as_raw("/x\x00", encoded=False))


def test_sender_streams_and_reports_short_files() -> None:
    """The producer writes exactly the span; a file shorter than promised ends with done(False)."""
    req = FakeRequest(b"/")
    results: list[bool] = []
    src = io.BytesIO(b"0123456789" * 10)
    src.seek(5)
    FileSender(src, 20, req, results.append, chunk=7).start()
    req.pull_all()
    assert req.body == b"5678901234567890123" + b"4" and results == [True] and src.closed
    short = FakeRequest(b"/")
    FileSender(io.BytesIO(b"abc"), 10, short, results.append).start()
    short.pull_all()
    assert results == [True, False] and short.body == b"abc"


def test_sender_compresses() -> None:
    """With a compressor the producer writes a gzip stream of the whole source."""
    req = FakeRequest(b"/")
    data = b"hello " * 50000
    done: list[bool] = []
    FileSender(io.BytesIO(data), None, req, done.append, chunk=4096,
               transform=zlib.compressobj(6, zlib.DEFLATED, 31)).start()
    req.pull_all()
    assert done == [True] and zlib.decompress(req.body, 31) == data


def test_exists(tree: Path) -> None:
    """exists(): regular files, directories only with '/' and an index or listing; never outside or hidden."""
    h = FileHandler(FileServer(hide=[".*"]), str(tree), clock=Clock())
    assert h.exists("/a.txt") and h.exists("/sub/") and not h.exists("/sub")
    assert not h.exists("/docs/") and FileHandler(FileServer(browse=True), str(tree), clock=Clock()).exists("/docs/")
    assert not h.exists("/a.txt/") and not h.exists("/nope") and not h.exists("/fifo")
    assert not h.exists("/.env") and not h.exists("/link-secret") and not h.exists("/../secret.txt")
    assert h.exists("/100%.txt", encoded=False) and h.exists("/100%25.txt")


def test_cache_bounds(tmp_path: Path) -> None:
    """The small-file cache drops least recently used entries beyond its byte budget."""
    import os

    cache = FileCache(max_file=100, max_total=250)
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * 100)
        assert cache.put(str(p), os.stat(p), p.read_bytes()) is not None
    assert len(cache) == 2 and cache.total == 200
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    assert cache.put(str(big), os.stat(big), big.read_bytes()) is None


def _expand(request: Any) -> Any:
    path = request.path.decode("latin-1")
    return lambda t: t.replace("{path}", path)


def test_try_paths_over_file_server(tree: Path) -> None:
    """try_paths picks the first existing candidate and serves it; none → the final status."""
    fs = FileHandler(FileServer(path404="/site/404.html"), str(tree), clock=Clock())
    h = TryPathsHandler(fs, TryPaths.parse("{path} {path}/ /a.txt =404"), _expand)
    r = FakeRequest(b"/sub")
    h.render(r)
    r.pull_all()
    assert r.body == b"<p>sub index</p>\n"
    r = FakeRequest(b"/no/such")
    h.render(r)
    r.pull_all()
    assert r.body == b"hello world\n"
    strict = TryPathsHandler(fs, TryPaths.parse("{path}.html =404"), _expand)
    r = FakeRequest(b"/zzz")
    strict.render(r)
    r.pull_all()
    assert r.code == 404 and r.body == b"<h1>custom not found</h1>\n"

    class Proxyish:
        streams_body = True

        def __init__(self) -> None:
            self.served: list[Any] = []

        def render(self, request: Any, ctx: Any = None) -> None:
            self.served.append(request)

    proxy = Proxyish()
    p = TryPathsHandler(proxy, TryPaths.parse("{path}/ =502"), _expand)
    assert p.streams_body
    r = FakeRequest(b"/q")
    p.render(r)
    assert proxy.served == [r]
    gone = TryPathsHandler(Proxyish(), TryPaths.parse("'^/nomatch(.*) {path} /x$1' =410"), _expand)
    r = FakeRequest(b"/q")
    gone.render(r)
    assert r.code == 410 and r.finished


def test_limit_req_step() -> None:
    """The step passes, delays (Deferred after the clock moves) or answers 503 + Retry-After."""
    clock = Clock()
    zone = RequestZone("z", parse_limit_req_zone("{client_ip} rate=10r/s"), clock)
    step = LimitReqStep(zone, LimitReq("z", burst=1), lambda r: "1.2.3.4", clock)
    assert step.check(FakeRequest(b"/")) is True
    delayed = step.check(FakeRequest(b"/"))
    assert isinstance(delayed, defer.Deferred)
    fired: list[bool] = []
    delayed.addCallback(fired.append)
    clock.advance(0.05)
    assert not fired
    clock.advance(0.06)
    assert fired == [True]
    assert isinstance(step.check(FakeRequest(b"/")), defer.Deferred)  # 0.9 left + 1 ≤ burst... delayed
    r = FakeRequest(b"/")
    assert step.check(r) is False
    assert r.code == 503 and r.header(b"retry-after") == b"1" and r.finished


def test_rate_limited_file_body_is_paced(tree: Path) -> None:
    """rate_limit paces a file body: at 20 KiB/s about 20 KiB per second leave, the rest waits."""
    clock = Clock()
    clock.advance(2_000_000_000)  # "now" after the files' mtime: small files may be cached
    h = FileHandler(FileServer(), str(tree), clock=clock, rate_limit=parse_rate("20k/s"))
    r = FakeRequest(b"/big.css")
    h.render(r)
    assert r.header(b"content-length") == b"420000"
    gate = r.producer
    assert r.streaming is True  # the throttle drives the file's pull producer itself
    sizes = []
    for _ in range(5):
        for _ in range(100):
            clock.advance(0.01)
        sizes.append(len(r.body))
    per_second = [b - a for a, b in zip([0] + sizes, sizes, strict=False)]
    assert all(15_000 <= n <= 30_000 for n in per_second[1:]), per_second
    gate.pauseProducing()  # the connection's buffer is full: nothing more is read
    before = len(r.body)
    for _ in range(100):
        clock.advance(0.01)
    assert len(r.body) == before
    gate.stopProducing()  # the client left
    assert not clock.getDelayedCalls()


def test_file_server_config_keys_and_wmproxy_spellings() -> None:
    """gzip/gzip_min_length default on/1k; wmproxy's precompressed list and disable_compress are read."""
    from wmproxy_tw.config import load_text

    base = '[http]\n[[http.server]]\nbind_addr = "127.0.0.1:0"\n[[http.server.location]]\n'
    fs = load_text(base + "file_server = { browse = true }\n", "a.toml").config.http.server[0].location[0].file_server
    assert fs.gzip and fs.gzip_min_length == 1024 and not fs.precompressed
    fs = load_text(base + 'file_server = { precompressed = ["gzip", "br"], disable_compress = true,'
                   ' gzip_min_length = "4k" }\n', "b.toml").config.http.server[0].location[0].file_server
    assert fs.precompressed and not fs.gzip and fs.gzip_min_length == 4096


def test_on_the_fly_gzip_of_a_file_cut_short_is_not_complete(tmp_path: Path) -> None:
    """A text file gzipped on the fly that shrinks while being sent ends incomplete (the connection
    is aborted), not with a complete-looking gzip stream of less content."""
    clock = Clock()
    clock.advance(2_000_000_000)
    text = tmp_path / "big.txt"
    text.write_bytes(b"0123456789abcdef" * 40000)  # beyond the small-file cache
    h = FileHandler(FileServer(), str(tmp_path), clock=clock)
    r = FakeRequest(b"/big.txt", headers={b"accept-encoding": b"gzip"})
    h.render(r)
    assert r.header(b"content-encoding") == b"gzip" and r.producer is not None
    r.producer.resumeProducing()  # one chunk out
    text.write_bytes(b"")  # the file is truncated under us
    r.pull_all()
    assert not r.finished and r.channel.transport.disconnecting  # cut, never finished


def _file_site(root: Path, **config: Any) -> tuple[Any, Clock]:
    """A reverse-proxy site with one file_server location, on a Clock (at the real time: files look settled)."""
    import time

    from wmproxy_tw.config.model import HttpServer, Location
    from wmproxy_tw.reverse.channel import Limits
    from wmproxy_tw.reverse.handlers import LocationCtx
    from wmproxy_tw.reverse.route import VirtualHosts, compile_rule
    from wmproxy_tw.reverse.site import ReverseSite, ServerCtx

    clock = Clock()
    clock.advance(time.time())
    handler = FileHandler(FileServer(root=str(root), **config), clock=clock)
    server = HttpServer(bind_addr="127.0.0.1:1")
    loc = LocationCtx("loc[0]", Location(rule="/"), server, compile_rule("/", {}), handler=handler)
    return ReverseSite(clock, VirtualHosts([([], ServerCtx(0, server, [loc]))]), Limits(), "test"), clock


def _get(site: Any, path: str, *fields: str) -> tuple[list[bytes], bytes]:
    t = StringTransport()
    ch = site.buildProtocol(None)
    ch.makeConnection(t)
    extra = "".join(f"{f}\r\n" for f in fields)
    ch.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    head, _, body = t.value().partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n") if not line.startswith(b"Date: ")], body


@pytest.mark.parametrize("config", [{}, {"cors": True, "cache_time": 60}, {"gzip": False}])
def test_plain_get_from_the_cache_is_the_general_answer(tmp_path: Path, config: dict[str, Any]) -> None:
    """A plain GET answered from the cached head block is byte-identical (Date aside) to the general path."""
    import os

    for name, data in (("a.txt", b"text " * 400), ("b.bin", bytes(range(256)) * 4)):
        f = tmp_path / name
        f.write_bytes(data)
        os.utime(f, (1_700_000_000, 1_700_000_000))
        site, _ = _file_site(tmp_path, **config)
        general = _get(site, f"/{name}", 'If-None-Match: "other"')  # validators: the general path
        plain = _get(site, f"/{name}")
        again = _get(site, f"/{name}", "Accept-Encoding: identity")
        assert plain == general == again and plain[1] == data
        assert plain[0][0] == b"HTTP/1.1 200 OK"
        entry = site.vhosts.default.locations[0].handler.cache._entries[os.path.realpath(f)]
        assert entry.heads  # the block was built and kept with the cached file


def test_plain_get_notices_a_changed_file(tmp_path: Path) -> None:
    """The cached head block goes with the file's version: new size or mtime, new ETag, length and body."""
    import os

    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    os.utime(f, (1_700_000_000, 1_700_000_000))
    site, _ = _file_site(tmp_path)
    first, body = _get(site, "/a.bin")
    assert body == b"x" * 100 and b"Content-Length: 100" in first
    f.write_bytes(b"y" * 200)
    os.utime(f, (1_700_000_100, 1_700_000_100))
    second, body = _get(site, "/a.bin")
    assert body == b"y" * 200 and b"Content-Length: 200" in second
    assert [x for x in first if x.startswith(b"ETag")] != [x for x in second if x.startswith(b"ETag")]


def test_gzip_capable_clients_still_get_gzip(tmp_path: Path) -> None:
    """A compressible file asked for with Accept-Encoding: gzip leaves the plain path (gzip on the fly)."""
    import os

    f = tmp_path / "a.txt"
    f.write_bytes(b"text " * 400)
    os.utime(f, (1_700_000_000, 1_700_000_000))
    site, _ = _file_site(tmp_path)
    _get(site, "/a.txt")
    head, body = _get(site, "/a.txt", "Accept-Encoding: gzip")
    assert b"Content-Encoding: gzip" in head and zlib.decompress(body, 31) == b"text " * 400
