"""Target resolution: group names in scope first, then literal host:port."""

from __future__ import annotations

import pytest

from wmproxy_tw.balance.build import resolve_target
from wmproxy_tw.config import load_text

CONF = """
[http]
[[http.upstream]]
name = "outer"
server = [{ addr = "127.0.0.1:1001" }]
[[http.upstream]]
name = "inner"
server = [{ addr = "127.0.0.1:1002", weight = 3 }, "127.0.0.1:1003"]
health_check = { interval = "5s", path = "/hc", fall = 2, rise = 1 }
"""


def _ups():  # type: ignore[no-untyped-def]
    return load_text(CONF).config.http.upstream  # type: ignore[union-attr]


def test_named_group_resolves_with_members_and_health() -> None:
    """http://inner names the group: its members, weights and health check come along."""
    t = resolve_target("http://inner/v2/", [_ups()])
    assert t.named_group and t.path == "/v2/" and t.scheme == "http"
    assert [(m.port, m.weight) for m in t.group.members] == [(1002, 3), (1003, 1)]
    assert t.group.health_check is not None and t.group.health_check.path == "/hc"


def test_literal_targets_get_default_ports() -> None:
    """A literal host gets the scheme's port; tcp:// needs an explicit one."""
    assert resolve_target("https://example.test", []).group.members[0].port == 443
    assert resolve_target("ws://127.0.0.1:9/x", []).group.members[0].port == 9
    assert resolve_target("127.0.0.1:8080", []).scheme == "http"
    with pytest.raises(ValueError, match="no port"):
        resolve_target("tcp://nowhere", [])
    with pytest.raises(ValueError):
        resolve_target("http://bad host/", [])
