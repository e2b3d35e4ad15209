"""`wmproxy reload --fleet`: every live node reloads from its own file and answers through Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from wmproxy_tw.cli import main
from wmproxy_tw.config import load_config, load_text
from wmproxy_tw.fleet.reload import fleet_reload
from wmproxy_tw.fleet.nodes import HEARTBEAT
from wmproxy_tw.service import ProxyService

from ..helpers import feature, run_python, until

pytestmark = pytest.mark.integration


def _conf(redis_url: str, node: str, greeting: str = "hello") -> str:
    return f"""disable_control = true
[fleet]
redis = "{redis_url}"
node_id = "{node}"
key_prefix = "rt:"
lease = "3s"
[http]
[[http.server]]
bind_addr = "127.0.0.1:0"
[[http.server.location]]
rule = "/"
static_response = "{greeting} from {node}\\n"
"""


async def _node(path: Path) -> ProxyService:
    svc = ProxyService(reactor, load_config(str(path)), control=False)
    svc.bind_all()
    svc.startService()
    return svc


async def _reload_fleet(conf: Path, timeout: float = 5.0) -> tuple[str, str, int]:
    out, err, code = await run_python("-m", "wmproxy_tw.cli", "reload", "--fleet", "-c", str(conf),
                                      "--timeout", str(timeout))
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_fleet_reload_reaches_every_node_and_reports_a_broken_file(redis_server: Any, tmp_path: Path) -> None:
    """All three nodes reload from their own files; a broken file and a silent node are reported; exit 1."""
    paths = [tmp_path / f"n{i}.toml" for i in (1, 2, 3)]
    for i, p in enumerate(paths, 1):
        p.write_text(_conf(redis_server.url, f"n{i}"))
    nodes = [await _node(p) for p in paths]
    fleets = [feature(svc, "fleet") for svc in nodes]
    try:
        await until(lambda: all(len(f.fleet_nodes) == 3 for f in fleets))
        await until(lambda: all(f.redis._subscriber.proto is not None for f in fleets))
        # all good (what the CLI runs, in this process): one line per node
        paths[0].write_text(_conf(redis_server.url, "n1", "hi"))
        lines, ok = await fleet_reload(reactor, load_config(str(paths[0])).config, 5.0)
        assert ok is True and [line.split()[:2] for line in lines] == [["n1", "ok"], ["n2", "ok"], ["n3", "ok"]]
        assert [svc.reloads for svc in nodes] == [1, 1, 1]
        assert "hi from n1" in nodes[0].config.model_dump_json()
        # n3's file is broken, and a registered node "ghost" never answers
        paths[2].write_text("[http\nbroken")
        ghost = {"node_id": "ghost", "instance": "x"}
        await fleets[0].redis.run(HEARTBEAT, ["rt:node:ghost", "rt:nodes"], ["ghost", json.dumps(ghost), 3000])
        out, err, code = await _reload_fleet(paths[0], timeout=1.5)
        assert code == 1 and "some nodes failed" in err, (out, err)
        rows = {line.split()[0]: line for line in out.splitlines()}
        assert list(rows) == ["ghost", "n1", "n2", "n3"]
        assert rows["n1"].split()[1] == rows["n2"].split()[1] == "ok"
        assert "FAILED" in rows["n3"] and "n3.toml" in rows["n3"] and "TOML" in rows["n3"]
        assert "FAILED  no answer within 1.5s" in rows["ghost"]
        assert [svc.reloads for svc in nodes] == [2, 2, 1]  # n3 runs on its previous configuration
        # the reloaded nodes kept their Redis connection (and subscription)
        assert all(feature(svc, "fleet").redis is f.redis for svc, f in zip(nodes, fleets, strict=True))
    finally:
        for svc in nodes:
            await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_fleet_reload_needs_fleet_and_redis(redis_server: Any, tmp_path: Path, capsys: Any) -> None:
    """Without -c or [fleet] (CLI), without Redis, or with no live node: a reason, nobody asked, exit 1."""
    plain = tmp_path / "plain.toml"
    plain.write_text('[proxy]\nbind = "127.0.0.1:0"\n')
    assert main(["reload", "--fleet"]) == 1 and "needs -c FILE" in capsys.readouterr().err
    assert main(["reload", "--fleet", "-c", str(plain)]) == 1 and "has no [fleet] section" in capsys.readouterr().err
    config = load_text(_conf(redis_server.url, "n1"), "n1.toml").config
    lines, why = await fleet_reload(reactor, config, 1.0)
    assert lines == [] and "no live node is registered" in why
    await redis_server.stop()
    lines, why = await fleet_reload(reactor, config, 1.0)
    assert lines == [] and why.startswith("cannot reach the fleet's Redis: Redis at redis://127.0.0.1:")
