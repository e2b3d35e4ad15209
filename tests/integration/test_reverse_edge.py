"""The edge features wired into the reverse pipeline: file_server, try_paths, allow/deny,
limit_req (zones kept over a reload), rate_limit on proxied bodies, HTTP/2 by ALPN."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from wmproxy_tw.config import load_text
from wmproxy_tw.reverse import http2

from ..filetree import make_tree
from ..helpers import bound_port, free_port, origin, run, start_proxy
from ..tlsutil import make_cert

pytestmark = pytest.mark.integration


async def status(*args: str) -> str:
    out, err, code = await run("curl", "-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", *args)
    assert code == 0, err
    return out.decode()


@pytest_twisted.ensureDeferred
async def test_files_try_paths_access_and_limit_req(tmp_path: Path) -> None:
    """file_server serves under the pipeline; try_paths falls back; deny_ip → 403; limit_req → 503,
    and a reload keeps the zone's state."""
    root = make_tree(tmp_path)
    port = free_port()  # a reload keeps a socket by address: not port 0
    text = f"""
[http.limit_req_zone]
one = "{{client_ip}} limit=1m rate=1r/m"
[[http.server]]
bind_addr = "127.0.0.1:{port}"
[[http.server.location]]
rule = "/limited"
limit_req = "zone=one burst=0 nodelay"
static_response = "ok"
[[http.server.location]]
rule = "/denied"
deny_ip = "127.0.0.0/8"
static_response = "no"
[[http.server.location]]
rule = "/"
root = "{root}"
try_paths = "{{path}} /a.txt"
file_server = {{ browse = true }}
"""
    svc = await start_proxy(text)
    base = f"http://127.0.0.1:{port}"
    try:
        out, err, code = await run("curl", "-sS", "--max-time", "10", f"{base}/sub/deeper/x.txt")
        assert code == 0 and out == b"x\n", err
        out, err, code = await run("curl", "-sS", "--max-time", "10", f"{base}/missing.txt")
        assert code == 0 and out == b"hello world\n", err  # try_paths fell back to /a.txt
        assert await status(f"{base}/denied") == "403"
        assert await status(f"{base}/limited") == "200"
        assert await status(f"{base}/limited") == "503"
        svc.reload(load_text(text, "test.toml"))
        assert await status(f"{base}/limited") == "503"  # the zone's state survived the reload
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_rate_limit_paces_proxied_bodies() -> None:
    """rate_limit paces a proxied response body (per client connection)."""
    web = origin()
    svc = await start_proxy(f"""
[[http.server]]
bind_addr = "127.0.0.1:0"
[[http.server.location]]
rule = "/"
rate_limit = "200k/s"
proxy_url = "http://127.0.0.1:{web.getHost().port}"
""")
    try:
        started = time.monotonic()
        out, err, code = await run("curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{bound_port(svc)}/blob?n=400000")
        took = time.monotonic() - started
        assert code == 0 and len(out) == 400000, err
        assert took >= 1.2, took  # ≈ 400 kB at 200 kB/s after the first burst
    finally:
        await svc.stopService()
        await defer.maybeDeferred(web.stopListening)


@pytest.mark.skipif(not http2.h2_available() or shutil.which("curl") is None, reason="needs h2 and curl")
@pytest_twisted.ensureDeferred
async def test_http2_on_a_tls_server(tmp_path: Path) -> None:
    """http2 = true on a bind_ssl server: curl --http2 gets HTTP/2 through the reverse pipeline."""
    root = make_tree(tmp_path)
    cert, key = make_cert(tmp_path, "h2.test")
    svc = await start_proxy(f"""
[[http.server]]
bind_ssl = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
http2 = true
[[http.server.location]]
rule = "/"
root = "{root}"
""")
    try:
        out, err, code = await run("curl", "--http2", "-k", "-sS", "--max-time", "10", "-w", " %{http_version}",
                                   f"https://127.0.0.1:{bound_port(svc)}/a.txt")
        assert code == 0 and out == b"hello world\n 2", err
    finally:
        await svc.stopService()
