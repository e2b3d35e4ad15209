"""Tunnel pieces without sockets: registry, credentials, backoff, start-up plan, header rules."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from wmproxy_tw.certgen import generate
from wmproxy_tw.cli import main
from wmproxy_tw.config import load_text
from wmproxy_tw.config.grammar import parse_header_rules
from wmproxy_tw.headers import apply_request_rules, apply_response_rules
from wmproxy_tw.listen import StartupError
from wmproxy_tw.service import plan
from wmproxy_tw.tunnel.client import Backoff, mapping_domains
from wmproxy_tw.tunnel.frames import Hello, Register
from wmproxy_tw.tunnel.server import (
    Credentials,
    MappingRegistry,
    Route,
    TunnelServer,
    normalize_host,
)

pytestmark = pytest.mark.timeout(30)


class FakeConn:
    """Just enough of a ServerConnection for the registry."""

    def __init__(self, label: str) -> None:
        self.client_label = label
        self.routes: list[Route] = []


def route(conn: Any, name: str, mode: str, *domains: str) -> Route:
    return Route(conn, name, mode, domains)


def test_registry_matches_exact_then_longest_wildcard() -> None:
    """Exact names win; otherwise the longest *.suffix; a wildcard never covers its own apex."""
    reg = MappingRegistry()
    one, two = FakeConn("one"), FakeConn("two")
    exact = route(one, "a", "http", "app.example.com")
    wide = route(two, "b", "http", "*.example.com")
    narrow = route(one, "c", "http", "*.eu.example.com")
    for r in (exact, wide, narrow):
        reg.add(r)
    assert reg.find("http", "APP.example.com:8080") is exact
    assert reg.find("http", "x.example.com") is wide
    assert reg.find("http", "a.b.example.com") is wide
    assert reg.find("http", "x.eu.example.com") is narrow
    assert reg.find("http", "example.com") is None
    assert reg.find("https", "app.example.com") is None  # modes have separate tables


def test_registry_remembers_departed_domains_for_502() -> None:
    """A removed route's domains are remembered as offline (bounded), until taken again."""
    reg = MappingRegistry()
    gone = route(FakeConn("gone"), "a", "http", "old.test", "*.wild.test")
    reg.add(gone)
    reg.remove(gone)
    assert reg.find("http", "old.test") is None
    assert reg.offline_owner("http", "old.test") == "gone"
    assert reg.offline_owner("http", "x.wild.test") == "gone"
    assert reg.offline_owner("http", "never.test") is None
    reg.add(route(FakeConn("new"), "a", "http", "old.test"))
    assert reg.offline_owner("http", "old.test") is None


def test_normalize_host() -> None:
    """Host headers lose case, port, brackets and the trailing dot."""
    assert normalize_host("Example.COM.:443") == "example.com"
    assert normalize_host("[::1]:8080") == "::1"
    assert normalize_host("::1") == "::1"


def _server(extra: str = "") -> TunnelServer:
    cfg = load_text(f'[proxy]\ncenter_addr = "127.0.0.1:0"\n{extra}').config.proxy
    server = TunnelServer(None, cfg, None, None)  # type: ignore[arg-type]
    server.public_modes |= {"http", "tcp"}
    return server


def test_refusals_name_the_conflict() -> None:
    """Conflicts and impossible mappings are refused with a reason naming the cause."""
    server = _server()
    one, two = FakeConn("one"), FakeConn("two")
    assert server.register(one, Register("web", "http", ("a.test",))) is None  # type: ignore[arg-type]
    assert server.register(two, Register("web", "http", ("A.TEST",))) == (  # type: ignore[arg-type]
        "domain 'A.TEST' is already served by client 'one' (mapping 'web')")
    assert server.register(one, Register("web2", "http", ("a.test",))) == (  # type: ignore[arg-type]
        "domain 'a.test' is already served by your mapping 'web'")
    assert "needs a domain" in server.register(two, Register("x", "http"))  # type: ignore[arg-type]
    assert "no map_https_bind" in server.register(two, Register("x", "https", ("s.test",)))  # type: ignore[arg-type]
    assert "no map_proxy_bind" in server.register(two, Register("x", "proxy"))  # type: ignore[arg-type]
    assert server.register(one, Register("t", "tcp")) is None  # type: ignore[arg-type]
    assert "already served by client 'one'" in server.register(two, Register("t", "tcp"))  # type: ignore[arg-type]
    assert "privileged" in server.register(two, Register("p", "tcp", remote_port=22))  # type: ignore[arg-type]
    assert "tcp and proxy" in server.register(two, Register("p", "http", ("h.test",), 2222))  # type: ignore[arg-type]
    bad_rule = Register("r", "http", ("r.test",), headers=("proxy + Bad:Name value",))
    assert server.register(two, bad_rule).startswith("bad header rule")  # type: ignore[arg-type]
    server.unregister_all(one)  # type: ignore[arg-type]
    assert server.register(two, Register("web", "http", ("a.test",))) is None  # type: ignore[arg-type]


def test_credentials_tokens_and_passwords() -> None:
    """Any configured token, or the username/password pair; anonymous only without credentials."""
    creds = Credentials("u", "p", ("t1", "t2"))
    assert creds.check(Hello(token="t2")) == "token #2"
    assert creds.check(Hello(token="t3")) is None
    assert creds.check(Hello(username="u", password="p")) == "user u"
    assert creds.check(Hello(username="u", password="x")) is None
    assert creds.check(Hello()) is None
    assert Credentials(None, None, ()).check(Hello()) == "anonymous"
    assert Credentials(None, None, ("t",)).check(Hello(username="u", password="p")) is None


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    """1 s first, then doubling with 50–100 % jitter, never above 30 s; reset starts over."""
    low, high = Backoff(rng=lambda: 0.0), Backoff(rng=lambda: 1.0)
    assert [high.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert [low.next() for _ in range(7)] == [1, 1, 2, 4, 8, 15, 15]
    high.reset()
    assert high.next() == 1


def test_mapping_domains_split() -> None:
    """A mapping's domain may list several names."""
    cfg = load_text('[proxy]\nserver = "127.0.0.1:1"\n[[proxy.mappings]]\nname = "w"\nmode = "http"\n'
                    'local_addr = "127.0.0.1:2"\ndomain = "a.test, *.b.test c.test"\n').config.proxy
    assert mapping_domains(cfg.mappings[0]) == ("a.test", "*.b.test", "c.test")


@pytest.mark.parametrize(("text", "needle"), [
    ('center_addr = "127.0.0.1:1"\ntc = true', "needs cert and key"),
    ('center_addr = "0.0.0.0:1"', "without username/password or tokens"),
    ('center_addr = "127.0.0.1:1"\nmap_https_bind = "127.0.0.1:2"', "map_https_bind needs map_cert"),
    ('map_http_bind = "127.0.0.1:2"', "needs center_addr"),
    ('mode = "client"', "needs server"),
    ('server = "127.0.0.1:1"\ntwo_way_tls = true', "tunnel client needs cert and key"),
    ('[[proxy.mappings]]\nname = "t"\nmode = "tcp"\nlocal_addr = "127.0.0.1:1"', "need server"),
    ('server = "127.0.0.1:1"\n[[proxy.mappings]]\nname = "p"\nmode = "proxy"', "exposes this node"),
])
def test_plan_refuses_what_cannot_start(text: str, needle: str) -> None:
    """Impossible tunnel configurations fail before binding, with one line naming the fix."""
    text = "[proxy]\n" + text
    with pytest.raises(StartupError, match=needle):
        plan(load_text(text).config)


def test_plan_describes_server_client_and_chaining() -> None:
    """--check lines name the tunnel listeners, the parent and the chained bind."""
    lines = plan(load_text('[proxy]\ncenter_addr = "127.0.0.1:7000"\nmap_http_bind = "127.0.0.1:7001"\n'
                           'tokens = ["x"]\n').config, control=False)
    assert lines == ["tunnel server on 127.0.0.1:7000 (cleartext, tokens)",
                     "tunnel http mappings on 127.0.0.1:7001"]
    lines = plan(load_text('[proxy]\nbind = "127.0.0.1:8090"\nserver = "10.0.0.1:7000"\nts = true\n'
                           '[[proxy.mappings]]\nname = "t"\nmode = "tcp"\nlocal_addr = "127.0.0.1:22"\n').config, control=False)
    assert lines == ["tunnel client of 10.0.0.1:7000 (TLS) publishing t (tcp)",
                     "forward proxy on 127.0.0.1:8090 chained to 10.0.0.1:7000"]


def test_heartbeat_interval_must_be_below_timeout() -> None:
    """heartbeat_interval >= heartbeat_timeout is a configuration error."""
    from wmproxy_tw.config import ConfigError

    with pytest.raises(ConfigError, match="heartbeat_interval"):
        load_text('[proxy]\nheartbeat_interval = "30s"\nheartbeat_timeout = "10s"\n')


def test_header_rules_and_variables() -> None:
    """Request rules act on the upstream request, response rules on the answer; vars expand."""
    rules = parse_header_rules(["proxy x-forward-for {client_ip}", "proxy + from $url",
                                "proxy ? X-Keep kept", "proxy - Cookie",
                                "+ last-modified 'from proxy'", "- etag", "Server hidden"])
    variables = {"client_ip": "192.0.2.1", "url": "http://h/p"}
    request = apply_request_rules([("Host", "h"), ("Cookie", "c"), ("X-Keep", "mine")], rules,
                                  variables)
    assert request == [("Host", "h"), ("X-Keep", "mine"), ("x-forward-for", "192.0.2.1"),
                       ("from", "http://h/p")]
    response = apply_response_rules([("ETag", "1"), ("Server", "a"), ("Server", "b")], rules,
                                    variables)
    assert response == [("last-modified", "from proxy"), ("Server", "hidden")]
    split = apply_request_rules([], parse_header_rules(["proxy X {unknown} $x {client_ip}"]), {"client_ip": "1\r\n2"})
    assert split == [("X", "{unknown} $x 12")]  # unknown names stay; no header splitting


def test_gen_cert_writes_a_ca_server_and_client(tmp_path: Path) -> None:
    """gen-cert makes a CA, a server cert for loopback + names, a client cert; keys are 0600."""
    files = generate(tmp_path, ["tunnel.example"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cli = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    assert srv.issuer == ca.subject and cli.issuer == ca.subject
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"tunnel.example", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate(tmp_path)


def test_gen_cert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`wmproxy gen-cert -o DIR` writes the files and says how to use them; refuses to overwrite."""
    assert main(["gen-cert", "-o", str(tmp_path), "-n", "127.0.0.2"]) == 0
    out = capsys.readouterr().out
    assert "tc = true" in out and str(tmp_path / "ca.pem") in out
    assert main(["gen-cert", "-o", str(tmp_path)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["gen-cert", "-o", str(tmp_path), "--force"]) == 0


def _public_http() -> tuple[Any, Any, Any]:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from wmproxy_tw.tunnel.httpmap import PublicHttp

    clock = Clock()
    server = _server()
    server.reactor = clock
    proto = PublicHttp(server, "http")
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_public_http_answers_404_naming_the_host_and_502_when_offline() -> None:
    """Unknown Host: a 404 page naming it (escaped); a departed client's host: 502 at once."""
    proto, transport, _clock = _public_http()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: <b>evil.test</b>\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 404 ") and b"&lt;b&gt;evil.test&lt;/b&gt;" in answer
    assert transport.disconnecting
    proto, transport, _clock = _public_http()
    proto.server.registry.offline[("http", "gone.test")] = "someone"
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: gone.test:8001\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 502 ")
    assert b"gone.test is offline" in transport.value()


def test_public_http_refuses_ambiguous_body_framing() -> None:
    """CL+TE on the public HTTP listener: 400 and a close before any routing (both fields were
    passed to the mapping, and the rest of the body parsed as a next request)."""
    proto, transport, _clock = _public_http()
    proto.dataReceived(b"POST / HTTP/1.1\r\nHost: t.test\r\nContent-Length: 40\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.value().count(b"HTTP/1.1") == 1
    assert transport.disconnecting


def test_public_http_deadlines() -> None:
    """A partial request head gets 408 after the header timeout; an idle connection just closes."""
    from wmproxy_tw.tunnel.httpmap import HEADER_TIMEOUT

    proto, transport, clock = _public_http()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHo")
    clock.advance(HEADER_TIMEOUT)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    proto, transport, clock = _public_http()
    clock.advance(HEADER_TIMEOUT)
    assert transport.value() == b"" and transport.disconnecting
    proto, transport, clock = _public_http()
    proto.dataReceived(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.disconnecting
