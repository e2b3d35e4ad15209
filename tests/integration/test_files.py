"""file_server over real sockets: every SPEC §4 key, containment, streaming."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web import resource

from ..filetree import OLD, SECRET, make_tree, serve
from ..httpraw import get, send

pytestmark = pytest.mark.integration


class Server:
    def __init__(self, port: Any, handler: Any) -> None:
        self.port, self.handler = port, handler
        self.n = port.getHost().port

    async def get(self, path: str | bytes, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
        return await get(self.n, path, headers, method)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.fixture
def start(tree: Path) -> Any:
    ports: list[Any] = []

    def _start(root: Path | None = None, **fs: Any) -> Server:
        port, handler = serve(root or tree, **fs)
        ports.append(port)
        return Server(port, handler)

    yield _start
    for p in ports:
        p.stopListening()


@pytest_twisted.ensureDeferred
async def test_get_and_head(start: Any, tree: Path) -> None:
    """GET gives the bytes with quoted ETag, Last-Modified, length, type; HEAD the same headers, no body."""
    s = start()
    r = await s.get("/a.txt")
    assert r.status == 200 and r.body == b"hello world\n"
    assert re.fullmatch(r'"[0-9a-f]+-c"', r.header("etag") or "")
    assert r.header("last-modified") == "Sun, 13 Sep 2020 12:26:40 GMT"
    assert r.header("content-length") == "12" and r.header("accept-ranges") == "bytes"
    assert r.header("content-type") == "text/plain; charset=utf-8"
    h = await s.get("/a.txt", method="HEAD")
    assert h.status == 200 and h.body == b"" and h.header("content-length") == "12"
    assert h.header("etag") == r.header("etag")
    big = await s.get("/data.bin")
    assert big.body == (tree / "data.bin").read_bytes()


@pytest_twisted.ensureDeferred
async def test_methods(start: Any) -> None:
    """Other methods get 405 with Allow; OPTIONS is a CORS preflight only with cors on."""
    s = start()
    for m in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        r = await s.get("/a.txt", method=m)
        assert r.status == 405 and r.header("allow") == "GET, HEAD", m
    c = start(cors=True)
    r = await c.get("/a.txt", method="OPTIONS")
    assert r.status == 204 and r.header("access-control-allow-origin") == "*"
    assert "Range" in (r.header("access-control-allow-headers") or "")
    r = await c.get("/a.txt")
    assert r.header("access-control-allow-origin") == "*"
    assert (await c.get("/a.txt", method="POST")).header("allow") == "GET, HEAD, OPTIONS"


@pytest_twisted.ensureDeferred
async def test_conditional_and_ranges(start: Any) -> None:
    """304 for a current ETag or date (no body), 206 for a range, 200 when If-Range is stale."""
    s = start()
    r = await s.get("/data.bin")
    etag, lm = r.header("etag"), r.header("last-modified")
    nm = await s.get("/data.bin", {"If-None-Match": etag})
    assert nm.status == 304 and nm.body == b"" and nm.header("etag") == etag
    assert (await s.get("/data.bin", {"If-Modified-Since": lm})).status == 304
    rg = await s.get("/data.bin", {"Range": "bytes=-16"})
    assert rg.status == 206 and rg.body == r.body[-16:]
    assert rg.header("content-range") == "bytes 10224-10239/10240"
    stale = await s.get("/data.bin", {"Range": "bytes=0-3", "If-Range": '"old"'})
    assert stale.status == 200 and len(stale.body) == 10240
    bad = await s.get("/data.bin", {"Range": "bytes=20000-"})
    assert bad.status == 416 and bad.header("content-range") == "bytes */10240"
    assert (await s.get("/data.bin", {"If-Match": '"nope"'})).status == 412


TRAVERSALS = [
    "/../secret.txt", "/..%2fsecret.txt", "/%2e%2e/secret.txt", "/%2e%2e%2fsecret.txt",
    "/%2E%2E/secret.txt", "/.%2e/secret.txt", "/%2e./secret.txt", "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt", "/%252e%252e/secret.txt", "/%252e%252e%252fsecret.txt",
    "/..%252fsecret.txt", "/..%5csecret.txt", "/..\\secret.txt", "/%5c..%5csecret.txt",
    "/sub\\..\\..\\secret.txt", "/secret.txt%00.html", "/a.txt%00/../../secret.txt", "/%00",
    "/....//secret.txt", "/..;/secret.txt", "/%c0%ae%c0%ae/secret.txt", "/%c0%af../secret.txt",
    "/%e0%80%ae%e0%80%ae/secret.txt", "//../secret.txt", "/./../secret.txt",
    "/sub/./../.././secret.txt", "/escape/secret.txt", "/escape/rootsecret/secret.txt", "/link-secret",
    "/sub/link-up/secret.txt", "/../rootsecret/secret.txt", "/%2e%2e/rootsecret/secret.txt",
    "/..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd", "/%2f%2e%2e%2fsecret.txt", "../secret.txt",
    "http://127.0.0.1/../secret.txt", "/sub/..%2f..%2fsecret.txt", "/%2e%2e%5csecret.txt",
    "/docs/outdir/secret.txt", "/docs/outdir/", "/escape/", "/%2e%2e", "/sub/link-up/",
    "/fifo", "/.env", "/%2e%65%6e%76", "/loop", "/loop/x",
]


@pytest_twisted.ensureDeferred
async def test_traversal_battery(start: Any) -> None:
    """Encoded traversals, NULs, backslashes, symlinks out of root: never the secret, never 500."""
    assert len(TRAVERSALS) >= 30
    s = start(browse=True, hide=[".*"])
    for path in TRAVERSALS:
        r = await s.get(path)
        assert SECRET not in r.raw, path
        assert b"PASSWORD" not in r.raw, path
        assert r.status in (400, 404), (path, r.status)
    # a listing never shows a link that leaves the root
    listing = await s.get("/docs/")
    assert b"outdir" not in listing.body
    root_listing = await s.get("/")
    assert b"escape" not in root_listing.body and b"link-secret" not in root_listing.body
    assert b"link-inside" in root_listing.body


@pytest_twisted.ensureDeferred
async def test_symlinks_followed_only_when_configured(start: Any) -> None:
    """A link inside the root is served; one leaving it only with follow_symlinks = true."""
    s = start()
    assert (await s.get("/link-inside")).body == b"hello world\n"
    assert (await s.get("/link-secret")).status == 404
    f = start(follow_symlinks=True)
    assert SECRET in (await f.get("/link-secret")).body
    assert (await f.get("/../secret.txt")).status == 400  # '..' is refused regardless


@pytest_twisted.ensureDeferred
async def test_index_redirect_and_listing(start: Any) -> None:
    """Index files; a directory without '/' is redirected (query kept); listing: escaped, sorted, dirs first."""
    s = start(browse=True, hide=[".*", "*.bak"])
    assert (await s.get("/sub/")).body == b"<p>sub index</p>\n"
    red = await s.get("/sub?x=1")
    assert red.status == 301 and red.header("location") == "/sub/?x=1"
    r = await s.get("/docs/")
    assert r.status == 200 and r.header("content-type") == "text/html; charset=utf-8"
    page = r.body.decode()
    assert "<script>" not in page and "&lt;script&gt;&amp;&quot;x.txt" in page
    assert 'href="%3Cscript%3E%26%22x.txt"' in page
    names = re.findall(r'<a href="[^"]*">([^<]*)</a>', page)
    assert names == ["../", "adir/", "zdir/", "&lt;script&gt;&amp;&quot;x.txt", "A.txt", "b.txt"]
    assert "2.0 KiB" in page and ".hidden" not in page and "notes.bak" not in page
    assert (await s.get("/docs/.hidden")).status == 404
    assert (await s.get("/docs/notes.bak")).status == 404
    nob = start()
    assert (await nob.get("/docs/")).status == 404


@pytest_twisted.ensureDeferred
async def test_precompressed_siblings(start: Any, tree: Path) -> None:
    """.br/.gz siblings are chosen by Accept-Encoding (br first), with Vary; identity otherwise."""
    s = start(precompressed=True, gzip=False)
    br = await s.get("/style.css", {"Accept-Encoding": "gzip, br"})
    assert br.header("content-encoding") == "br" and br.body == b"BROTLI-PLACEHOLDER"
    assert br.header("content-type") == "text/css; charset=utf-8" and br.header("vary") == "Accept-Encoding"
    gz = await s.get("/style.css", {"Accept-Encoding": "gzip"})
    assert gz.header("content-encoding") == "gzip"
    assert gzip.decompress(gz.body) == (tree / "style.css").read_bytes()
    plain = await s.get("/style.css")
    assert plain.header("content-encoding") is None and plain.header("vary") == "Accept-Encoding"
    assert plain.body == (tree / "style.css").read_bytes()
    assert (await s.get("/app.js", {"Accept-Encoding": "br;q=0, gzip"})).header("content-encoding") == "gzip"


@pytest_twisted.ensureDeferred
async def test_gzip_on_the_fly(start: Any, tree: Path) -> None:
    """Text above gzip_min_length is gzipped (weak ETag, Vary), small/binary/ranged is not; big files stream."""
    s = start()
    ae = {"Accept-Encoding": "gzip"}
    r = await s.get("/page.html", ae)
    assert r.header("content-encoding") == "gzip" and r.header("vary") == "Accept-Encoding"
    assert (r.header("etag") or "").startswith("W/")
    assert gzip.decompress(r.body) == (tree / "page.html").read_bytes()
    again = await s.get("/page.html", {**ae, "If-None-Match": r.header("etag") or ""})
    assert again.status == 304
    assert (await s.get("/a.txt", ae)).header("content-encoding") is None  # below the minimum
    assert (await s.get("/data.bin", ae)).header("content-encoding") is None  # not text
    ranged = await s.get("/page.html", {**ae, "Range": "bytes=0-5"})
    assert ranged.status == 206 and ranged.body == b"<html>" and ranged.header("content-encoding") is None
    big = await s.get("/big.css", ae)
    assert big.header("transfer-encoding") == "chunked" and big.header("content-length") is None
    assert gzip.decompress(big.body) == (tree / "big.css").read_bytes()
    head = await s.get("/big.css", ae, method="HEAD")
    assert head.header("content-encoding") == "gzip" and head.body == b""
    off = start(gzip=False)
    assert (await off.get("/page.html", ae)).header("content-encoding") is None


@pytest_twisted.ensureDeferred
async def test_small_keys(start: Any) -> None:
    """cache_time, path404, robots, ext_mimetype, default_mimetype, prefix, query ignored, names."""
    s = start(cache_time="1h", path404="/site/404.html", robots="User-agent: *\nDisallow: /\n",
              ext_mimetype={"xyz": "application/x-xyz"}, default_mimetype="text/plain", prefix="/static/")
    r = await s.get("/static/a.txt?v=123&x=../../secret.txt")
    assert r.status == 200 and r.body == b"hello world\n" and r.header("cache-control") == "max-age=3600"
    nf = await s.get("/static/nope.txt")
    assert nf.status == 404 and nf.body == b"<h1>custom not found</h1>\n"
    assert nf.header("content-type") == "text/html; charset=utf-8"
    assert (await s.get("/elsewhere/a.txt")).status == 404
    robots = await s.get("/robots.txt")
    assert robots.status == 200 and robots.body == b"User-agent: *\nDisallow: /\n"
    assert (await s.get("/static/weird.xyz")).header("content-type") == "application/x-xyz"
    assert (await s.get("/static/noext")).header("content-type") == "text/plain; charset=utf-8"
    assert (await s.get("/static/100%25.txt")).body == b"percent\n"
    assert (await s.get("/static/caf%C3%A9.txt")).body == b"cafe\n"
    d = start()
    assert (await d.get("/noext")).header("content-type") == "application/octet-stream"
    assert (await d.get("/robots.txt")).status == 404


@pytest_twisted.ensureDeferred
async def test_small_file_cache_invalidation(start: Any, tree: Path) -> None:
    """Hot small files come from memory; a changed file (mtime/size) is read again."""
    s = start()
    assert (await s.get("/a.txt")).body == b"hello world\n"
    assert (await s.get("/a.txt")).body == b"hello world\n"
    assert s.handler.cache.hits >= 1
    (tree / "a.txt").write_bytes(b"changed, longer\n")
    os.utime(tree / "a.txt", (OLD + 10, OLD + 10))
    assert (await s.get("/a.txt")).body == b"changed, longer\n"
    (tree / "a.txt").write_bytes(b"changed, LONGER\n")  # same size
    os.utime(tree / "a.txt", (OLD + 20, OLD + 20))
    assert (await s.get("/a.txt")).body == b"changed, LONGER\n"


@pytest_twisted.ensureDeferred
async def test_keepalive_pipelined_requests(start: Any, tree: Path) -> None:
    """Several requests on one connection (streamed and cached bodies) all complete in order."""
    s = start()
    reqs = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"a.txt", b"big.css", b"data.bin"))
    reqs += b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    r = await send(s.n, reqs)
    assert r.raw.count(b"HTTP/1.1 200 OK") == 4
    assert len(r.raw) > (tree / "big.css").stat().st_size


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest_twisted.ensureDeferred
async def test_big_sparse_file_streams_with_flat_memory(start: Any, tmp_path: Path) -> None:
    """A 200 MB file is sent by the producer: curl gets every byte, this process's RSS stays flat."""
    from twisted.internet import reactor, task

    from ..helpers import run

    big = tmp_path / "root" / "big.iso"
    big.touch()
    os.truncate(big, 200 * 1024 * 1024)  # sparse: no disk used
    s = start()
    before = _rss()
    peak = [before]
    sampler = task.LoopingCall(lambda: peak.append(_rss()))
    sampler.clock = reactor
    sampler.start(0.05)
    try:
        out, _err, code = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                   f"http://127.0.0.1:{s.n}/big.iso")
    finally:
        sampler.stop()
    assert code == 0 and out.decode() == f"200 {200 * 1024 * 1024}"
    growth = max(peak) - before
    assert growth < 32 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"


@pytest_twisted.ensureDeferred
async def test_prefix_root_redirects(start: Any) -> None:
    """The prefix itself is the root folder: '/static' redirects to '/static/', which lists."""
    s = start(prefix="/static", browse=True)
    r = await s.get("/static")
    assert r.status == 301 and r.header("location") == "/static/"
    listing = await s.get("/static/")
    assert listing.status == 200 and b"a.txt" in listing.body and b'href="../"' not in listing.body


@pytest_twisted.ensureDeferred
async def test_rate_limit_paces_a_download(start: Any, tree: Path) -> None:
    """rate_limit = 2m/s: a 2 MiB file takes about a second (loose real-socket check)."""
    from twisted.internet import reactor

    from wmproxy_tw.config.grammar import parse_rate

    (tree / "two.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    s = start(rate_limit=parse_rate("2m/s"))
    t0 = reactor.seconds()
    r = await s.get("/two.bin")
    elapsed = reactor.seconds() - t0
    assert r.status == 200 and len(r.body) == 2 * 1024 * 1024
    assert 0.7 <= elapsed <= 3.0, elapsed


class _Limited(resource.Resource):
    """A test stand-in for the pipeline: limit_req step, then the file handler."""

    isLeaf = True

    def __init__(self, step: Any, handler: Any) -> None:
        super().__init__()
        self.step, self.handler = step, handler

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        ok = self.step.check(request)
        if ok is True:
            return self.handler.render(request)
        if ok is not False:
            ok.addCallback(lambda go: self.handler.render(request) if go else None)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_limit_req_real_sockets(tree: Path) -> None:
    """rate=10r/s burst=5: 100 requests over ~1 s from one address → ~15 pass; another address passes."""
    from twisted.internet import reactor
    from twisted.web import server

    from wmproxy_tw.config.model import FileServer, LimitReq, parse_limit_req_zone
    from wmproxy_tw.limits import LimitReqStep, RequestZone
    from wmproxy_tw.reverse.files import FileHandler

    from ..helpers import deferLater

    zone = RequestZone("z", parse_limit_req_zone("{client_ip} limit=1m rate=10r/s"), reactor)
    step = LimitReqStep(zone, LimitReq("z", burst=5), lambda r: r.getClientAddress().host, reactor)
    handler = FileHandler(FileServer(), str(tree), clock=reactor)
    site = server.Site(_Limited(step, handler))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    n = port.getHost().port
    try:
        pending = []
        for _ in range(100):
            pending.append(defer.ensureDeferred(get(n, "/a.txt")))
            await deferLater(0.01)
        results = await defer.gatherResults(pending)
        statuses = [r.status for r in results]
        assert set(statuses) <= {200, 503}
        assert 12 <= statuses.count(200) <= 19, statuses.count(200)
        refused = next(r for r in results if r.status == 503)
        assert int(refused.header("retry-after") or "0") >= 1
        other = await get(n, "/a.txt", source="127.0.0.2")
        assert other.status == 200
    finally:
        await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_file_shrinking_mid_download_aborts(start: Any, tmp_path: Path) -> None:
    """A file cut short while it is sent: the connection is aborted, never a short body passed as whole."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    big = tmp_path / "root" / "shrinks.bin"
    big.touch()
    os.truncate(big, 64 * 1024 * 1024)
    s = start()

    class Cutter(Protocol):
        def __init__(self) -> None:
            self.got = 0
            self.done: defer.Deferred[None] = defer.Deferred()

        def connectionMade(self) -> None:
            self.transport.write(b"GET /shrinks.bin HTTP/1.1\r\nHost: x\r\n\r\n")

        def dataReceived(self, data: bytes) -> None:
            if self.got == 0:
                os.truncate(big, 1024 * 1024)
            self.got += len(data)

        def connectionLost(self, reason: object = None) -> None:
            self.done.callback(None)

    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", s.n).connect(Factory.forProtocol(Cutter))
    await proto.done
    assert proto.got < 64 * 1024 * 1024  # the connection ended early: the client knows the body is short
