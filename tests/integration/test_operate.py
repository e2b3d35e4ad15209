"""Operating a running twistd: reload (API, CLI, SIGHUP), graceful stop, metrics, status, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from ..helpers import (
    WMPROXY,
    connect_tunnel,
    deferLater,
    echo_server,
    free_port,
    http_call,
    origin,
    raw_connect,
    run,
    run_twistd,
    wait_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def write_conf(path: Path, control: int, binds: list[int], extra: str = "") -> Path:
    addrs = " ".join(f"127.0.0.1:{p}" for p in binds)
    path.write_text(f'control = "127.0.0.1:{control}"\nshutdown_timeout = "5s"\n{extra}\n'
                    f'[proxy]\nbind = "{addrs}"\n')
    return path


async def status(control: int, token: str | None = None) -> dict[str, Any]:
    code, body = await http_call("GET", f"http://127.0.0.1:{control}/status", token)
    assert code == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


async def echo_roundtrip(client: Any, data: bytes) -> None:
    client.transport.write(data)
    assert await client.wait_for(data) == data


@pytest_twisted.ensureDeferred
async def test_reload_keeps_connections_and_swaps_listeners(tmp_path: Path) -> None:
    """`wmproxy reload`: a tunnel opened before works after; a kept port stays, a removed one closes, a new one opens."""
    control, p1, p2, p3 = (free_port() for _ in range(4))
    conf = write_conf(tmp_path / "conf.toml", control, [p1, p2])
    proc = run_twistd(conf)
    echo = echo_server()
    try:
        await wait_port(control)
        before = await status(control)
        tunnel = await connect_tunnel(p1, echo.getHost().port)
        await echo_roundtrip(tunnel, b"before reload")

        write_conf(conf, control, [p1, p3])
        out, err, code = await run(WMPROXY, "reload", "-c", str(conf))
        assert code == 0, err
        assert f"opened tcp 127.0.0.1:{p3}".encode() in out and f"closed tcp 127.0.0.1:{p2}".encode() in out

        await echo_roundtrip(tunnel, b"after reload")  # in flight: kept, still working
        await wait_port(p2, up=False)  # removed
        fresh = await connect_tunnel(p3, echo.getHost().port)  # added
        await echo_roundtrip(fresh, b"new listener")
        again = await connect_tunnel(p1, echo.getHost().port)  # kept
        await echo_roundtrip(again, b"kept listener")

        after = await status(control)
        assert after["config"]["hash"] != before["config"]["hash"] and after["config"]["reloads"] == 1
        assert sorted(x["bound"] for x in after["listeners"]) == sorted(
            f"127.0.0.1:{p}" for p in (p1, p3, control))
        for c in (tunnel, fresh, again):
            c.transport.loseConnection()
        code, body = await http_call("POST", f"http://127.0.0.1:{control}/stop")
        assert code == 202, body
        assert await proc.ended.addTimeout(20, reactor) == 0
    finally:
        await proc.stop()
        await echo.stopListening()
    assert b"Traceback" not in proc.err + proc.out


@pytest_twisted.ensureDeferred
async def test_invalid_reload_changes_nothing_then_sighup_reloads(tmp_path: Path) -> None:
    """An invalid file: 400 with every message, nothing changes; a port in use: 400, rolled back; SIGHUP reloads."""
    control, p1, p2, p3 = (free_port() for _ in range(4))
    conf = write_conf(tmp_path / "conf.toml", control, [p1])
    proc = run_twistd(conf)
    blocker = echo_server()
    try:
        await wait_port(control)
        before = await status(control)

        conf.write_text(f'control = "127.0.0.1:{control}"\nworkers = "many"\n[proxy]\nbind = "nonsense"\n')
        code, body = await http_call("POST", f"http://127.0.0.1:{control}/reload")
        doc = json.loads(body)
        assert code == 400 and doc["ok"] is False and len(doc["errors"]) == 2
        assert any("proxy.bind" in e and "nonsense" in e for e in doc["errors"])
        assert any("workers" in e for e in doc["errors"])
        out, err, rc = await run(WMPROXY, "reload", "-u", f"127.0.0.1:{control}")
        assert rc == 1 and b"reload refused" in err and b"nonsense" in err

        # a new listener that cannot bind: the reload fails, the one it opened first is closed again
        write_conf(conf, control, [p1, p2, blocker.getHost().port])
        code, body = await http_call("POST", f"http://127.0.0.1:{control}/reload")
        assert code == 400 and b"cannot listen" in body, body
        await wait_port(p2, up=False)

        same = await status(control)
        assert same["config"] == dict(before["config"], age=same["config"]["age"])
        assert [x["bound"] for x in same["listeners"]] == [x["bound"] for x in before["listeners"]]

        write_conf(conf, control, [p1, p3])
        proc.signal("HUP")
        await wait_port(p3)
        assert (await status(control))["config"]["reloads"] == 1
        metrics = (await http_call("GET", f"http://127.0.0.1:{control}/metrics"))[1].decode()
        reloads = {s.labels["result"]: s.value for f in text_string_to_metric_families(metrics)
                   for s in f.samples if s.name == "wmproxy_reloads_total"}
        assert reloads == {"ok": 1.0, "failed": 3.0}
        assert await proc.stop() == 0
    finally:
        await proc.stop()
        await blocker.stopListening()
    assert b"Traceback" not in proc.err + proc.out


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_an_inflight_tunnel_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: no new connections, an open CONNECT tunnel keeps working and, once it ends, exit 0 at once."""
    control, p1 = free_port(), free_port()
    conf = write_conf(tmp_path / "conf.toml", control, [p1])
    proc = run_twistd(conf)
    echo = echo_server()
    try:
        await wait_port(p1)
        tunnel = await connect_tunnel(p1, echo.getHost().port)
        await echo_roundtrip(tunnel, b"one")
        started = time.monotonic()
        proc.signal("TERM")
        await wait_port(p1, up=False)
        await echo_roundtrip(tunnel, b"still draining")
        assert proc.code is None
        tunnel.transport.loseConnection()
        code = await proc.ended.addTimeout(10, reactor)
        assert code == 0, proc.err
        assert time.monotonic() - started < 4.5  # well before shutdown_timeout (5s)
    finally:
        await proc.stop()
        await echo.stopListening()
    assert b"Traceback" not in proc.err + proc.out


@pytest_twisted.ensureDeferred
async def test_sigterm_aborts_what_outlives_shutdown_timeout(tmp_path: Path) -> None:
    """A tunnel still open after shutdown_timeout is closed by the proxy; the exit status is still 0."""
    control, p1 = free_port(), free_port()
    conf = tmp_path / "conf.toml"
    conf.write_text(f'control = "127.0.0.1:{control}"\nshutdown_timeout = "1s"\n[proxy]\nbind = "127.0.0.1:{p1}"\n')
    proc = run_twistd(conf)
    echo = echo_server()
    try:
        await wait_port(p1)
        tunnel = await connect_tunnel(p1, echo.getHost().port)
        started = time.monotonic()
        proc.signal("TERM")
        await tunnel.closed.addTimeout(10, reactor)
        assert 0.9 <= time.monotonic() - started < 5
        assert await proc.ended.addTimeout(10, reactor) == 0
        assert b"shutdown_timeout (1.0s) passed: aborted" in proc.out + proc.err
    finally:
        await proc.stop()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_and_cli_with_token(tmp_path: Path) -> None:
    """/metrics parses and its forward request counter equals the requests sent; status/stop via the CLI and a token."""
    control, p1 = free_port(), free_port()
    conf = write_conf(tmp_path / "conf.toml", control, [p1], 'control_token = "t0ken"')
    proc = run_twistd(conf)
    web = origin()
    try:
        await wait_port(p1)
        url = f"http://127.0.0.1:{web.getHost().port}/m"
        n = 7
        for _ in range(n):
            _o, err, code = await run("curl", "-sS", "-o", "/dev/null", "-x", f"http://127.0.0.1:{p1}", url)
            assert code == 0, err
        code, _b = await http_call("GET", f"http://127.0.0.1:{control}/metrics")
        assert code == 401
        code, body = await http_call("GET", f"http://127.0.0.1:{control}/metrics", "t0ken")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        counted = sum(s.value for s in families["wmproxy_requests"].samples
                      if s.name == "wmproxy_requests_total" and s.labels["feature"] == "forward")
        assert counted == n
        out_bytes = [s.value for s in families["wmproxy_bytes"].samples
                     if s.name == "wmproxy_bytes_total" and s.labels["direction"] == "out"]
        assert out_bytes and out_bytes[0] > 0
        assert "wmproxy_upstream_latency_seconds" in families and "wmproxy_open_connections" in families

        out, err, rc = await run(WMPROXY, "status", "-u", f"127.0.0.1:{control}")
        assert rc == 1 and b"needs a token" in err
        out, err, rc = await run(WMPROXY, "status", "-c", str(conf))
        assert rc == 0, err
        assert f"127.0.0.1:{p1}".encode() in out and b"requests 7" in out
        out, err, rc = await run(WMPROXY, "stop", "-c", str(conf))
        assert rc == 0 and b"stopping" in out, err
        assert await proc.ended.addTimeout(20, reactor) == 0
    finally:
        await proc.stop()
        await web.stopListening()


@pytest_twisted.ensureDeferred
async def test_cli_errors_are_clear(tmp_path: Path) -> None:
    """No instance: one clear line and exit 1; `wmproxy check` lists listeners or the errors."""
    port = free_port()
    _o, err, rc = await run(WMPROXY, "status", "-u", f"127.0.0.1:{port}")
    assert rc == 1 and err.startswith(f"wmproxy: no instance answers at http://127.0.0.1:{port}".encode())
    assert b"Traceback" not in err and len(err.strip().splitlines()) == 1
    good = write_conf(tmp_path / "good.toml", port, [free_port()])
    out, err, rc = await run(WMPROXY, "check", "-c", str(good))
    assert rc == 0 and b"configuration OK" in out and f"control API on 127.0.0.1:{port}".encode() in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nbind = "nonsense"\n')
    _o, err, rc = await run(WMPROXY, "check", "-c", str(bad))
    assert rc == 1 and b"proxy.bind" in err
    _o, err, rc = await run(WMPROXY, "reload", "-c", str(bad))
    assert rc == 1 and b"proxy.bind" in err and b"Traceback" not in err
    off = tmp_path / "off.toml"
    off.write_text('disable_control = true\n[proxy]\nbind = "127.0.0.1:1"\n')
    _o, err, rc = await run(WMPROXY, "stop", "-c", str(off))
    assert rc == 1 and b"no control API" in err


@pytest_twisted.ensureDeferred
async def test_disable_control_and_dashboard(tmp_path: Path) -> None:
    """disable_control: no control listener; otherwise GET / is the dashboard page."""
    control, p1 = free_port(), free_port()
    conf = write_conf(tmp_path / "conf.toml", control, [p1], "disable_control = true")
    proc = run_twistd(conf)
    try:
        await wait_port(p1)
        await deferLater(0.2)
        await wait_port(control, up=False, seconds=0.5)
    finally:
        assert await proc.stop() == 0
    conf = write_conf(tmp_path / "conf.toml", control, [p1])
    proc = run_twistd(conf)
    try:
        await wait_port(control)
        code, body = await http_call("GET", f"http://127.0.0.1:{control}/")
        assert code == 200 and b"<title>wmproxy-tw</title>" in body
        client = await raw_connect(control)  # an idle control connection does not hold up the stop
        assert await proc.stop() == 0
        await client.closed
    finally:
        await proc.stop()


@pytest_twisted.ensureDeferred
async def test_sigusr1_reopens_a_log_moved_by_logrotate(tmp_path: Path) -> None:
    """SIGUSR1 after logrotate moved twistd.log: a new twistd.log is opened and written to."""
    control, p1 = free_port(), free_port()
    conf = write_conf(tmp_path / "conf.toml", control, [p1])
    log = tmp_path / "twistd.log"
    proc = run_twistd(conf, f"--logfile={log}")
    try:
        await wait_port(control)
        # sockets are bound before the reactor runs; our signal handlers come just after
        for _ in range(200):
            if log.exists() and b"SIGUSR1 reopens logs" in log.read_bytes():
                break
            await deferLater(0.05)
        log.rename(tmp_path / "twistd.log.1")
        proc.signal("USR1")
        for _ in range(100):
            if log.exists():
                break
            await deferLater(0.05)
        assert log.exists()
        code, _b = await http_call("POST", f"http://127.0.0.1:{control}/reload")
        assert code == 200
        assert await proc.stop() == 0
        assert b"reloaded" in log.read_bytes() and b"stopped" in log.read_bytes()
        assert b"reloaded" not in (tmp_path / "twistd.log.1").read_bytes()
    finally:
        await proc.stop()
