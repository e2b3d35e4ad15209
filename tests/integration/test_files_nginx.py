"""Range and conditional requests answered like nginx serving the same folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol

from ..filetree import make_tree, serve
from ..helpers import ENV, deferLater, free_port
from ..httpraw import Response, get

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is installed by `make test-deps`"),
]

NGINX_CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    default_type application/octet-stream;
    if_modified_since before;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class _Quiet(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


async def _wait_listening(port: int, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        try:
            proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
            proto.transport.loseConnection()
            return
        except error.ConnectError:
            await deferLater(0.05)
    raise AssertionError(f"nginx did not listen on {port}")


@pytest_twisted.async_yield_fixture
async def nginx(tmp_path: Path) -> Any:
    root = make_tree(tmp_path)
    run = tmp_path / "nginx"
    run.mkdir()
    port = free_port()
    conf = run / "nginx.conf"
    # workers of a root master run as "nobody" and could not read pytest's private tmp folders
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, dir=run, port=port, root=root))
    proto = _Quiet()
    proc = reactor.spawnProcess(proto, shutil.which("nginx") or "nginx",
                                ["nginx", "-p", str(run), "-c", str(conf), "-g", "daemon off;"],
                                env=ENV)
    yield root, port
    try:
        proc.signalProcess("TERM")
    except error.ProcessExitedAlready:
        pass
    await proto.ended


@pytest_twisted.ensureDeferred
async def test_ranges_and_conditionals_match_nginx(nginx: Any) -> None:
    """For 25+ request variants: status, Content-Range, Content-Length and body equal nginx's."""
    root, nport = nginx
    await _wait_listening(nport)
    port, _ = serve(root)
    ours = port.getHost().port
    try:
        first = await get(nport, "/data.bin")
        etag, lm = first.header("etag") or "", first.header("last-modified") or ""
        assert first.status == 200 and etag
        mine = await get(ours, "/data.bin")
        assert (mine.header("etag"), mine.header("last-modified")) == (etag, lm)  # same validators
        older = "Sat, 01 Jan 2000 00:00:00 GMT"
        variants: list[tuple[str, str, dict[str, str]]] = [
            ("GET", "/data.bin", {}),
            ("GET", "/data.bin", {"Range": "bytes=0-0"}),
            ("GET", "/data.bin", {"Range": "bytes=0-99"}),
            ("GET", "/data.bin", {"Range": "bytes=100-"}),
            ("GET", "/data.bin", {"Range": "bytes=-100"}),
            ("GET", "/data.bin", {"Range": "bytes=-20000"}),
            ("GET", "/data.bin", {"Range": "bytes=10230-20000"}),
            ("GET", "/data.bin", {"Range": "bytes=10240-"}),
            ("GET", "/data.bin", {"Range": "bytes=-0"}),
            ("GET", "/data.bin", {"Range": "bytes=500-100"}),
            ("GET", "/data.bin", {"Range": "bytes=abc"}),
            ("GET", "/data.bin", {"Range": "items=0-5"}),
            ("GET", "/data.bin", {"Range": "bytes= 5 - 9"}),
            ("GET", "/data.bin", {"Range": "bytes=0-1,20000-30000"}),
            ("GET", "/data.bin", {"Range": "bytes=10-20", "If-Range": etag}),
            ("GET", "/data.bin", {"Range": "bytes=10-20", "If-Range": '"stale-1"'}),
            ("GET", "/data.bin", {"Range": "bytes=10-20", "If-Range": lm}),
            ("GET", "/data.bin", {"Range": "bytes=10-20", "If-Range": older}),
            ("GET", "/data.bin", {"If-None-Match": etag}),
            ("GET", "/data.bin", {"If-None-Match": '"other", ' + etag}),
            ("GET", "/data.bin", {"If-None-Match": '"other"'}),
            ("GET", "/data.bin", {"If-Modified-Since": lm}),
            ("GET", "/data.bin", {"If-Modified-Since": older}),
            ("GET", "/data.bin", {"If-None-Match": etag, "Range": "bytes=0-9"}),
            ("GET", "/data.bin", {"If-Match": '"other"'}),
            ("GET", "/data.bin", {"If-Unmodified-Since": older}),
            ("HEAD", "/data.bin", {}),
            ("HEAD", "/data.bin", {"Range": "bytes=0-9"}),
            ("GET", "/empty.txt", {"Range": "bytes=0-"}),
            ("GET", "/empty.txt", {"Range": "bytes=0-0"}),
            ("GET", "/a.txt?x=1", {"Range": "bytes=-5"}),
            ("GET", "/nope.txt", {}),
        ]
        mismatches = []
        for method, path, headers in variants:
            theirs: Response = await get(nport, path, headers, method)
            got: Response = await get(ours, path, headers, method)
            keys = (theirs.status, theirs.header("content-range"))
            if theirs.status < 400:
                keys += (theirs.header("content-length"), theirs.body)
            mine_keys = (got.status, got.header("content-range"))
            if theirs.status < 400:
                mine_keys += (got.header("content-length"), got.body)
            if keys != mine_keys:
                mismatches.append((method, path, headers, keys[:3], mine_keys[:3]))
        assert not mismatches, mismatches
    finally:
        await defer.maybeDeferred(port.stopListening)
