"""A tunnel client as a real `twistd wmproxy` process: killed, restarted, stopped (SIGSTOP)."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor

from wmproxy_tw.tunnel.server import TunnelServer

from ..helpers import ENV, run
from .test_tunnel import feature, port_of, stop, tagged_origin, tunnel_server, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TWISTD = str(Path(sys.executable).with_name("twistd"))


class Twistd(protocol.ProcessProtocol):
    """A twistd child; ``ended`` fires when it exits."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(getattr(signal, f"SIG{name}"))
        except error.ProcessExitedAlready:
            pass


def spawn(config: Path) -> Twistd:
    proc = Twistd()
    argv = [TWISTD, "-n", "--pidfile=", "wmproxy", "-c", str(config)]
    reactor.spawnProcess(proc, TWISTD, argv, env=ENV)
    return proc


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
    procs: list[Twistd] = []

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
