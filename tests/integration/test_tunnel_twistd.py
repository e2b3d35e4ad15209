"""A tunnel client as a real `twistd wmproxy` process: killed, restarted, stopped (SIGSTOP)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from wmproxy_tw.tunnel.server import TunnelServer

from ..helpers import TWISTD, Running, run, run_twistd
from .test_tunnel import feature, port_of, stop, tagged_origin, tunnel_server, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

def spawn(config: Path) -> Running:
    return run_twistd(config)


async def status_of(http: int, host: str) -> int:
    out, _err, _code = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "-H", f"Host: {host}", f"http://127.0.0.1:{http}/")
    return int(out or 0)


@pytest_twisted.ensureDeferred
async def test_killed_restarted_and_stopped_client_process(tmp_path: Path) -> None:
    """kill -9 → 502 within 1 s; restart → registered again; SIGSTOP → dead within the timeout."""
    web = tagged_origin("W")
    srv = await tunnel_server('heartbeat_interval = "300ms"\nheartbeat_timeout = "1s"\n')
    server = feature(srv, TunnelServer)
    http = port_of(srv, "tunnel http")
    config = tmp_path / "client.toml"
    config.write_text(textwrap.dedent(f"""\
        disable_control = true
        [proxy]
        server = "127.0.0.1:{port_of(srv, 'tunnel server')}"
        token = "good-token"
        heartbeat_interval = "300ms"
        heartbeat_timeout = "1s"
        [[proxy.mappings]]
        name = "web"
        mode = "http"
        local_addr = "127.0.0.1:{web.getHost().port}"
        domain = "w.test"
        """))
    procs: list[Running] = []

    def published() -> bool:
        return server.registry.find("http", "w.test") is not None

    try:
        procs.append(spawn(config))
        await until(published, timeout=20)
        assert await status_of(http, "w.test") == 200

        procs[-1].signal("KILL")
        killed = reactor.seconds()
        await until(lambda: not published(), timeout=1.0)
        assert await status_of(http, "w.test") == 502
        assert reactor.seconds() - killed < 1.0
        await procs[-1].ended

        procs.append(spawn(config))
        await until(published, timeout=20)
        assert await status_of(http, "w.test") == 200

        procs[-1].signal("STOP")
        stopped = reactor.seconds()
        await until(lambda: not published(), timeout=3.0)
        assert reactor.seconds() - stopped <= 1.0 + 0.5  # heartbeat_timeout, plus scheduling
        assert await status_of(http, "w.test") == 502
    finally:
        for proc in procs:
            if not proc.ended.called:
                proc.signal("CONT")
                proc.signal("KILL")
                await proc.ended
        await stop(srv, web)


@pytest_twisted.ensureDeferred
async def test_check_lists_tunnel_listeners_and_bad_cert_exits_1(tmp_path: Path) -> None:
    """--check prints the tunnel lines; a missing certificate stops start-up with one line."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    from wmproxy_tw.certgen import generate

    generate(str(tmp_path / "certs"), [], "wmproxy-client", 30, False)
    server_toml = tmp_path / "tunnel-server.toml"
    server_toml.write_text((conf / "tunnel-server.toml").read_text().replace('"certs/', f'"{tmp_path}/certs/'))
    out, err, code = await run(TWISTD, "wmproxy", "--check", "-c", str(server_toml))
    assert code == 0, err
    assert b"tunnel server on 127.0.0.1:8091 (TLS, tokens)" in out
    assert b"tunnel http mappings on 127.0.0.1:8001" in out
    out, err, code = await run(TWISTD, "wmproxy", "--check", "proxy", "-S", "127.0.0.1:9",
                               "--ts")
    assert code == 0, err
    assert b"forward proxy on 127.0.0.1:8090 chained to 127.0.0.1:9" in out
    config = tmp_path / "server.toml"
    config.write_text('[proxy]\ncenter_addr = "127.0.0.1:0"\ntc = true\n'
                      f'cert = "{tmp_path}/nope.pem"\nkey = "{tmp_path}/nope.key"\n')
    out, err, code = await run(TWISTD, "-n", "--pidfile=", "wmproxy", "-c", str(config))
    lines = err.decode().strip().splitlines()
    assert code == 1 and len(lines) == 1 and "nope.pem" in lines[0], err
    assert b"Traceback" not in out + err
