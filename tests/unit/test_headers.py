"""Header rules and {variable} templates (wmproxy_tw/headers.py)."""

from __future__ import annotations

import pytest

from wmproxy_tw.config.grammar import parse_header_rules
from wmproxy_tw.headers import RequestVars, Template, apply_header_rules, compile_rules, split_rules

V = RequestVars(client_ip="10.1.2.3", client_port=5555, host="example.test:8080", url="/a/b?x=1",
                path="/a/b", query="x=1", scheme="https", method="POST",
                header=lambda n: {"user-agent": "curl/8"}.get(n.lower()))


@pytest.mark.parametrize("text,expected", [
    ("{client_ip}", "10.1.2.3"),
    ("$client_ip", "10.1.2.3"),
    ("${client_ip}x", "10.1.2.3x"),
    ("{client_addr}", "10.1.2.3:5555"),
    ("{host} {url} {path} {scheme}", "example.test:8080 /a/b?x=1 /a/b https"),
    ("$host$path", "example.test:8080/a/b"),
    ("{query}|{method}", "x=1|POST"),
    ("{http_user_agent}", "curl/8"),
    ("{http_x_missing}", ""),
    ("{nope} $nope {json: 1}", "{nope} $nope {json: 1}"),
    ("/ro$1/x", "/ro$1/x"),
    ("no variables", "no variables"),
])
def test_template_renders_request_variables(text: str, expected: str) -> None:
    """Both {name} and $name forms expand; unknown names stay as written."""
    assert Template(text).render(V) == expected


def test_template_missing_replacement_and_args() -> None:
    """A caller may replace unknown names (the access log prints '-') and receive {name(arg)} arguments."""
    seen = []

    def lookup(name: str, arg: str | None) -> str | None:
        seen.append((name, arg))
        return "D" if name == "d" else None

    assert Template("{d(%Y-%m-%d)} {x}").render(lookup, missing="-") == "D -"
    assert seen == [("d", "%Y-%m-%d"), ("x", None)]


def test_template_utf8_literals_become_wire_bytes() -> None:
    """Non-ASCII configuration text reaches the wire as UTF-8 (Latin-1 clothing)."""
    out = Template("你好 {client_ip}").render(V)
    assert out.encode("latin-1") == "你好 10.1.2.3".encode()


def _rules(*texts: str):  # type: ignore[no-untyped-def]
    return compile_rules(parse_header_rules(list(texts)))


def test_rule_operations() -> None:
    """set replaces all, + adds, - deletes all, ? sets only when absent; names compare case-insensitively."""
    headers = [("X-A", "1"), ("x-a", "2"), ("X-B", "b"), ("Keep", "k")]
    apply_header_rules(headers, _rules("X-A one", "+ X-B b2", "- keep", "? X-B never", "? X-C {client_ip}"), V)
    assert headers == [("X-B", "b"), ("X-A", "one"), ("X-B", "b2"), ("X-C", "10.1.2.3")]


def test_split_rules_by_target() -> None:
    """'proxy ...' rules act on the upstream request, the others on the response."""
    req, resp = split_rules(parse_header_rules(["proxy X-Up 1", "+ X-Down 2", "proxy - Cookie"]))
    assert [(r.op, r.name) for r in req] == [("set", "X-Up"), ("del", "Cookie")]
    assert [(r.op, r.name) for r in resp] == [("add", "X-Down")]


def test_rule_value_cannot_split_a_header() -> None:
    """A decoded CR/LF carried by a variable is removed from the value."""
    evil = RequestVars(path="/a\r\nSet-Cookie: x=1")
    headers: list[tuple[str, str]] = []
    apply_header_rules(headers, _rules("X-Path {path}"), evil)
    assert headers == [("X-Path", "/aSet-Cookie: x=1")]
