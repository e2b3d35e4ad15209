"""The fleet's lines in `wmproxy status` and `wmproxy reload --fleet`, and the nodes' answers."""

from __future__ import annotations

import json

from wmproxy_tw.cli import format_status
from wmproxy_tw.fleet.reload import answer, format_answers


def test_status_shows_the_fleet() -> None:
    """`wmproxy status` prints one fleet line: this node, Redis, the live nodes."""
    doc = {"fleet": {"node_id": "a", "redis": "redis://h:6379/0", "available": True,
                     "nodes": [{"node_id": "a", "advertise": "10.0.0.1:7001"}, {"node_id": "b"}]}}
    assert "fleet: node a, Redis redis://h:6379/0 available, 2 live node(s): a (10.0.0.1:7001), b (-)" in format_status(doc)
    assert "fleet" not in format_status({"fleet": None})


def test_answers_and_lines() -> None:
    """A node answers its summary or its errors; the CLI prints one aligned line per node, missing ones failed."""
    ok = json.loads(answer({"id": "x"}, "node-a", {"config": "a.toml", "kept": [1, 2], "opened": [], "closed": [3]}))
    assert ok == {"id": "x", "node_id": "node-a", "ok": True,
                  "summary": "reloaded a.toml: kept 2, opened 0, closed 1 listeners"}
    bad = json.loads(answer({"id": "x"}, "b", ["b.toml: http.server[0].bind_addr: bad port"]))
    assert bad["ok"] is False and bad["errors"] == ["b.toml: http.server[0].bind_addr: bad port"]
    lines, all_ok = format_answers([{"node_id": "node-a"}, {"node_id": "b"}, {"node_id": "c"}],
                                   {"node-a": ok, "b": bad, "late": ok}, 2.0)
    assert lines == ["node-a  ok      reloaded a.toml: kept 2, opened 0, closed 1 listeners",
                     "b       FAILED  b.toml: http.server[0].bind_addr: bad port",
                     "c       FAILED  no answer within 2s",
                     "late    ok      reloaded a.toml: kept 2, opened 0, closed 1 listeners"]
    assert all_ok is False
    assert format_answers([{"node_id": "a"}], {"a": ok}, 1)[1] is True
