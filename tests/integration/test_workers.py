"""workers = 2: a supervisor and two workers sharing the listeners; restart, reload, stop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from ..helpers import deferLater, free_port, http_call, origin, raw_connect, run, run_twistd, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def status(control: int) -> dict[str, Any]:
    code, body = await http_call("GET", f"http://127.0.0.1:{control}/status")
    assert code == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


async def ready_workers(control: int, count: int, exclude: set[int] = frozenset(), seconds: float = 20) -> list[dict[str, Any]]:  # type: ignore[assignment]
    for _ in range(int(seconds * 10)):
        workers = (await status(control)).get("workers", [])
        ready = [w for w in workers if w["state"] == "ready" and w["pid"] not in exclude]
        if len(ready) == count:
            return workers  # type: ignore[no-any-return]
        await deferLater(0.1)
    raise AssertionError(f"not {count} ready workers: {workers}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_restart_reload_stop(tmp_path: Path) -> None:
    """Both worker pids accept connections; a killed worker is restarted while the other serves; reload reaches both."""
    control, p1, p2 = free_port(), free_port(), free_port()
    conf = tmp_path / "conf.toml"
    conf.write_text(f'control = "127.0.0.1:{control}"\nworkers = 2\nshutdown_timeout = "3s"\n'
                    f'[proxy]\nbind = "127.0.0.1:{p1}"\n')
    proc = run_twistd(conf)
    web = origin()
    url = f"http://127.0.0.1:{web.getHost().port}/w"
    try:
        await wait_port(control)
        workers = await ready_workers(control, 2)
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and proc.pid not in pids
        for _ in range(40):  # the kernel spreads new connections over both sockets
            c = await raw_connect(p1)
            c.transport.loseConnection()
            await c.closed
        workers = (await status(control))["workers"]
        assert all(w["accepted"] > 0 for w in workers), workers
        assert sum(w["accepted"] for w in workers) == 40

        victim = workers[0]["pid"]
        os.kill(victim, 9)
        for _ in range(5):  # the survivor keeps answering meanwhile
            _o, err, code = await run("curl", "-sS", "-o", "/dev/null", "-x", f"http://127.0.0.1:{p1}", url)
            assert code == 0, err
        workers = await ready_workers(control, 2, exclude={victim})
        assert victim not in {w["pid"] for w in workers}
        assert [w["restarts"] for w in workers] == [1, 0] and workers[0]["last_exit"] == "signal 9"

        conf.write_text(conf.read_text().replace(f'bind = "127.0.0.1:{p1}"', f'bind = "127.0.0.1:{p1} 127.0.0.1:{p2}"'))
        code, body = await http_call("POST", f"http://127.0.0.1:{control}/reload")
        doc = json.loads(body)
        assert code == 200 and [w["ok"] for w in doc["workers"]] == [True, True], doc
        assert f"tcp 127.0.0.1:{p2}" in doc["opened"]
        for _ in range(5):
            _o, err, code = await run("curl", "-sS", "-o", "/dev/null", "-x", f"http://127.0.0.1:{p2}", url)
            assert code == 0, err
        code, body = await http_call("GET", f"http://127.0.0.1:{control}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert sum(s.value for s in families["wmproxy_requests"].samples if s.name == "wmproxy_requests_total") == 10
        assert [s.value for s in families["wmproxy_workers"].samples] == [2]

        pids = {w["pid"] for w in (await status(control))["workers"]}
        assert await proc.stop() == 0
        for _ in range(50):
            if not any(alive(p) for p in pids):
                break
            await deferLater(0.1)
        assert not any(alive(p) for p in pids)
    finally:
        await proc.stop()
        await web.stopListening()
    assert b"Traceback" not in proc.out + proc.err


@pytest_twisted.ensureDeferred
async def test_workers_refuse_port_zero_and_port_in_use(tmp_path: Path) -> None:
    """workers = 2 with port 0 or a port in use: exit 1 with one line, before any worker starts."""
    conf = tmp_path / "conf.toml"
    conf.write_text('disable_control = true\nworkers = 2\n[proxy]\nbind = "127.0.0.1:0"\n')
    proc = run_twistd(conf)
    assert await proc.ended.addTimeout(20, reactor) == 1
    assert b"needs fixed ports" in proc.err + proc.out
    web = origin()
    try:
        conf.write_text(f'disable_control = true\nworkers = 2\n[proxy]\nbind = "127.0.0.1:{web.getHost().port}"\n')
        proc = run_twistd(conf)
        assert await proc.ended.addTimeout(20, reactor) == 1
        assert b"cannot listen" in proc.err + proc.out and b"Traceback" not in proc.err + proc.out
    finally:
        await web.stopListening()
