"""Location rules and virtual-host choice of the reverse proxy."""

from __future__ import annotations

import pytest

from wmproxy_tw.config.model import RuleTable
from wmproxy_tw.reverse.route import RouteInfo, VirtualHosts, compile_rule


def info(path: str = "/", host: str = "a.test", method: str = "GET", ip: str = "127.0.0.1",
         scheme: str = "http", ws: bool = False) -> RouteInfo:
    return RouteInfo(path, host, method, ip, scheme, ws)


@pytest.mark.parametrize("rule,path,hit", [
    ("/api", "/api", True), ("/api", "/api/x", True), ("/api", "/apix", True), ("/api", "/ap", False),
    ("/api/", "/api", False), ("=/exact", "/exact", True), ("=/exact", "/exact/", False),
    ("/static/*.css", "/static/a/b.css", True), ("/static/*.css", "/static/a.js", False),
    ("~^/v[0-9]+/", "/v2/x", True), ("~^/v[0-9]+/", "/vx/", False), ("~*\\.PNG$", "/a.png", True),
    ("~\\.PNG$", "/a.png", False),
])
def test_path_rules(rule: str, path: str, hit: bool) -> None:
    """String rules: prefix, =exact, * glob over the whole path, ~regex and ~*case-insensitive regex."""
    assert compile_rule(rule, {}).matches(info(path)) is hit


def test_prefix_is_known_only_for_prefix_rules() -> None:
    """Only a plain prefix rule has a prefix (what a path in proxy_url replaces)."""
    assert compile_rule("/api/", {}).prefix == "/api/"
    assert compile_rule("~/api", {}).prefix is None
    assert compile_rule(RuleTable(path="/x", method="GET"), {}).prefix == "/x"


def test_table_rules() -> None:
    """A table matches when every key given matches."""
    r = compile_rule(RuleTable(path="/p", host="*.example.test", method="GET POST",
                               client_ip="10.0.0.0/8", scheme="https"), {})
    ok = info("/p/1", "www.example.test", "POST", "10.1.1.1", "https")
    assert r.matches(ok)
    for bad in (info("/q", "www.example.test", "POST", "10.1.1.1", "https"),
                info("/p", "example.test", "POST", "10.1.1.1", "https"),
                info("/p", "www.example.test", "PUT", "10.1.1.1", "https"),
                info("/p", "www.example.test", "POST", "11.1.1.1", "https"),
                info("/p", "www.example.test", "POST", "10.1.1.1", "http")):
        assert not r.matches(bad)


def test_named_rules_and_builtin_ws() -> None:
    """@NAME uses http.match_names; @ws is built in (WebSocket upgrades); loops are refused."""
    names = {"api": RuleTable(path="/api", method="GET"), "alias": "@api"}
    assert compile_rule("@alias", names).matches(info("/api/x"))
    assert not compile_rule("@alias", names).matches(info("/api/x", method="POST"))
    assert compile_rule("@ws", {}).matches(info(ws=True))
    assert not compile_rule("@ws", {}).matches(info())
    with pytest.raises(ValueError, match="circular"):
        compile_rule("@a", {"a": "@b", "b": "@a"})


def test_virtual_hosts() -> None:
    """Exact names first, then wildcards; anything else gets the first server."""
    vh = VirtualHosts([(["first.test"], 1), (["b.test", "c.test"], 2), (["*.wild.test"], 3)])
    assert [vh.pick(h) for h in ("first.test", "c.test", "x.wild.test", "wild.test", "", "other")] == [1, 2, 3, 1, 1, 1]
