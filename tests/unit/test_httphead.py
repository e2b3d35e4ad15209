"""Unit tests for the sans-IO HTTP/1.x request-head parser and proxy helpers."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmproxy_tw.forward.httphead import (
    MAX_LEADING_EMPTY_LINES,
    HttpHeadError,
    ProxyTarget,
    RequestHead,
    RequestHeadParser,
    body_framing,
    hop_by_hop_clean,
    parse_basic_auth,
    parse_proxy_target,
)

SIMPLE = (
    b"GET http://example.com/a?b=1 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent:  curl/8.0 \t\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)


def whole(data: bytes) -> list[bytes]:
    """Deliver everything in one chunk."""
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    """Deliver one byte per chunk."""
    return [data[i : i + 1] for i in range(len(data))]


def triples(data: bytes) -> list[bytes]:
    """Deliver three bytes per chunk."""
    return [data[i : i + 3] for i in range(0, len(data), 3)]


@pytest.fixture(params=[whole, bytewise, triples], ids=["whole", "bytewise", "triples"])
def split(request: pytest.FixtureRequest) -> Callable[[bytes], list[bytes]]:
    """Each test runs with the stream delivered whole, byte by byte and in triples."""
    chunker: Callable[[bytes], list[bytes]] = request.param
    return chunker


def parse(
    chunks: Iterable[bytes], parser: RequestHeadParser | None = None
) -> tuple[RequestHead | None, bytes]:
    """Feed chunks until a head completes; return it and the leftover bytes."""
    parser = parser or RequestHeadParser()
    chunks = list(chunks)
    for i, chunk in enumerate(chunks):
        head = parser.feed(chunk)
        if head is not None:
            rest = b"".join(chunks[i + 1 :])
            return head, parser.take_leftover() + rest
    return None, b""


def head_of(data: bytes) -> RequestHead:
    """Parse a complete head in one feed."""
    head = RequestHeadParser().feed(data)
    assert head is not None
    return head


def make_head(
    method: str = "GET",
    target: str = "/",
    version: str = "HTTP/1.1",
    headers: Iterable[tuple[str, str]] = (),
) -> RequestHead:
    """Build a RequestHead directly."""
    return RequestHead(method, target, version, tuple(headers))


def status_of(data: bytes, parser: RequestHeadParser | None = None) -> int:
    """Feed data byte by byte and return the HttpHeadError status raised."""
    parser = parser or RequestHeadParser()
    with pytest.raises(HttpHeadError) as info:
        for chunk in bytewise(data):
            parser.feed(chunk)
    return info.value.status


# -- parser: good heads ------------------------------------------------------------


def test_simple_head(split: Callable[[bytes], list[bytes]]) -> None:
    """A simple absolute-form GET parses into method, target, version and headers."""
    head, rest = parse(split(SIMPLE))
    assert head == RequestHead(
        "GET",
        "http://example.com/a?b=1",
        "HTTP/1.1",
        (("Host", "example.com"), ("User-Agent", "curl/8.0"), ("Accept", "*/*")),
    )
    assert rest == b""


def test_bare_lf_accepted(split: Callable[[bytes], list[bytes]]) -> None:
    """Bare LF terminators are recognised (RFC 9112 §2.2), also mixed with CRLF."""
    head, _ = parse(split(b"GET / HTTP/1.0\nHost: a\r\nX: y\n\n"))
    assert head is not None
    assert head.headers == (("Host", "a"), ("X", "y"))


def test_leftover_is_body_and_pipelined_request(
    split: Callable[[bytes], list[bytes]],
) -> None:
    """Bytes after the head are returned by take_leftover."""
    data = b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n"
    head, rest = parse(split(data))
    assert head is not None and head.method == "POST"
    assert rest == b"abcGET / HTTP/1.1\r\n"


def test_parser_reusable_after_take_leftover() -> None:
    """take_leftover resets the parser so the next head can be parsed."""
    parser = RequestHeadParser()
    first = parser.feed(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGE")
    assert first is not None and first.target == "/1"
    rest = parser.take_leftover()
    second = parser.feed(rest)
    assert second is not None and second.target == "/2"
    rest = parser.take_leftover()
    assert rest == b"GE"
    assert parser.feed(rest + b"T /3 HTTP/1.1\r\n\r\n") == make_head(target="/3")


def test_feed_after_head_without_take_leftover_is_an_error() -> None:
    """Feeding again before take_leftover is a programming error."""
    parser = RequestHeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_take_leftover_before_head_is_empty() -> None:
    """take_leftover before a head is complete returns b'' and keeps state."""
    parser = RequestHeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\n") is None
    assert parser.take_leftover() == b""
    assert parser.feed(b"\r\n") == make_head()


def test_leading_empty_lines_ignored(split: Callable[[bytes], list[bytes]]) -> None:
    """Empty lines before the request-line are ignored."""
    head, _ = parse(split(b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n"))
    assert head == make_head()


def test_too_many_leading_empty_lines() -> None:
    """More than MAX_LEADING_EMPTY_LINES empty lines before the request-line is 400."""
    assert (
        status_of(b"\r\n" * (MAX_LEADING_EMPTY_LINES + 1) + b"GET / HTTP/1.1\r\n\r\n")
        == 400
    )


def test_ows_stripped_and_inner_space_kept(
    split: Callable[[bytes], list[bytes]],
) -> None:
    """Values lose surrounding SP/HTAB but keep inner whitespace; empty values allowed."""
    head, _ = parse(split(b"GET / HTTP/1.1\r\nA: \t x \t y \t\r\nB:\r\nC:   \r\n\r\n"))
    assert head is not None
    assert head.headers == (("A", "x \t y"), ("B", ""), ("C", ""))


def test_obs_text_decoded_latin1() -> None:
    """Bytes 0x80-0xFF in values are kept, decoded as Latin-1."""
    head = head_of(b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\n\r\n")
    assert head.get("x-name") == "caf\xe9"


def test_get_and_get_all_case_insensitive() -> None:
    """get returns the first match, get_all every match, ignoring case."""
    head = head_of(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nHost: h\r\n\r\n")
    assert head.get("X-a") == "1"
    assert head.get_all("X-A") == ["1", "2"]
    assert head.get("missing") is None
    assert head.get_all("missing") == []
    assert head.headers[1] == ("x-a", "2")


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1", "HTTP/1.2"])
def test_http1_versions_accepted(version: str) -> None:
    """Any HTTP/1.x version is accepted and reported verbatim."""
    assert head_of(f"GET / {version}\r\n\r\n".encode()).version == version


def test_binary_without_lf_fails_at_its_first_byte() -> None:
    """Binary input with no LF (a TLS ClientHello, a SOCKS4 greeting) is no method token: 400 at the
    first byte, not at the header deadline; a token still being received waits for more."""
    for noise in (b"\x16\x03\x01\x02\x00\x01", b"\x04\x01\x00\x50", b"GET\x00"):
        parser = RequestHeadParser(max_line=8192)
        with pytest.raises(HttpHeadError) as info:
            parse(bytewise(noise), parser)
        assert info.value.status == 400, noise
    assert RequestHeadParser().feed(b"\r\nPROPFI") is None
    with pytest.raises(HttpHeadError) as info:
        RequestHeadParser(max_line=8).feed(b"GETGETGETGET")
    assert info.value.status == 414


def test_exact_limits_accepted() -> None:
    """Lines of exactly max_line and exactly max_headers fields are accepted."""
    parser = RequestHeadParser(max_line=40, max_header_bytes=1000, max_headers=3)
    target = "/" + "a" * (40 - len("GET  HTTP/1.1") - 1)
    request_line = f"GET {target} HTTP/1.1".encode()
    assert len(request_line) == 40
    field = b"X: " + b"v" * 37
    data = request_line + b"\r\n" + (field + b"\r\n") * 3 + b"\r\n"
    head, _ = parse(bytewise(data), parser)
    assert head is not None and len(head.headers) == 3


def test_header_bytes_limit_exact() -> None:
    """Field lines totalling exactly max_header_bytes (with CRLFs) are accepted."""
    parser = RequestHeadParser(max_header_bytes=20)
    data = b"GET / HTTP/1.1\r\nA: 12345\r\nB: 12345\r\n\r\n"
    head, _ = parse(bytewise(data), parser)
    assert head is not None
    assert (
        status_of(
            b"GET / HTTP/1.1\r\nA: 12345\r\nB: 123456\r\n\r\n",
            RequestHeadParser(max_header_bytes=20),
        )
        == 431
    )


# -- parser: limits fail early -------------------------------------------------------


def test_huge_request_line_fails_early() -> None:
    """A 1 MB request-line without CRLF fails with 414 once max_line is passed."""
    parser = RequestHeadParser(max_line=8192)
    fed = 0
    chunk = b"GET /" + b"a" * 995
    with pytest.raises(HttpHeadError) as info:
        for _ in range(1024):
            parser.feed(chunk)
            fed += len(chunk)
            chunk = b"a" * 1000
    assert info.value.status == 414
    assert fed <= 8192


def test_request_line_limit_exact_byte() -> None:
    """The 414 is raised on the first byte beyond max_line, even byte by byte."""
    parser = RequestHeadParser(max_line=10)
    for b in b"GET /aaaaa":
        parser.feed(bytes([b]))
    parser.feed(b"\r")  # a CR may still become CRLF
    with pytest.raises(HttpHeadError) as info:
        parser.feed(b"a")
    assert info.value.status == 414


def test_long_request_line_in_one_chunk() -> None:
    """A complete but too long request-line is 414."""
    assert status_of(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n") == 414
    with pytest.raises(HttpHeadError) as info:
        RequestHeadParser().feed(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert info.value.status == 414


def test_long_header_line_fails_early() -> None:
    """A header line beyond max_line fails with 431 without waiting for its end."""
    parser = RequestHeadParser(max_line=100)
    parser.feed(b"GET / HTTP/1.1\r\n")
    parser.feed(b"X: " + b"a" * 97)
    with pytest.raises(HttpHeadError) as info:
        parser.feed(b"a")
    assert info.value.status == 431


def test_long_header_line_in_one_chunk() -> None:
    """A complete header line beyond max_line is 431."""
    with pytest.raises(HttpHeadError) as info:
        RequestHeadParser(max_line=100).feed(
            b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n"
        )
    assert info.value.status == 431


def test_header_section_too_large_fails_early() -> None:
    """Field lines beyond max_header_bytes fail with 431 mid-line."""
    parser = RequestHeadParser(max_line=1000, max_header_bytes=50)
    parser.feed(b"GET / HTTP/1.1\r\n" + b"A: " + b"a" * 37 + b"\r\n")
    with pytest.raises(HttpHeadError) as info:
        parser.feed(b"B: bbbbbbbbb")
    assert info.value.status == 431


def test_too_many_headers() -> None:
    """More than max_headers fields is 431."""
    data = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
    assert status_of(data) == 431
    assert (
        status_of(
            b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 4, RequestHeadParser(max_headers=3)
        )
        == 431
    )


# -- parser: malformed heads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(
            b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400, id="bare-cr-request-line"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400, id="bare-cr-in-value"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400, id="cr-cr-lf"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\r\n", 400, id="cr-only-line"),
        pytest.param(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400, id="obs-fold-space"),
        pytest.param(b"GET / HTTP/1.1\r\nA: b\r\n\tc\r\n\r\n", 400, id="obs-fold-tab"),
        pytest.param(
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400, id="whitespace-first-field"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, id="space-before-colon"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400, id="tab-before-colon"
        ),
        pytest.param(b"GET / HTTP/1.1\r\n: a\r\n\r\n", 400, id="empty-name"),
        pytest.param(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400, id="no-colon"),
        pytest.param(
            b"GET / HTTP/1.1\r\nBad(Name): a\r\n\r\n", 400, id="bad-name-char"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nX\xff: a\r\n\r\n", 400, id="non-ascii-name"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400, id="del-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\x1bb\r\n\r\n", 400, id="esc-in-value"),
        pytest.param(b"GET /  HTTP/1.1\r\n\r\n", 400, id="double-space"),
        pytest.param(b"GET / HTTP/1.1 \r\n\r\n", 400, id="trailing-space"),
        pytest.param(b"GET /\r\n\r\n", 400, id="http-0.9"),
        pytest.param(b"GET\r\n\r\n", 400, id="method-only"),
        pytest.param(b"GET / HTTP/1.1 extra\r\n\r\n", 400, id="four-parts"),
        pytest.param(b"GET\t/ HTTP/1.1\r\n\r\n", 400, id="tab-separator"),
        pytest.param(b"G(T / HTTP/1.1\r\n\r\n", 400, id="bad-method"),
        pytest.param(b" GET / HTTP/1.1\r\n\r\n", 400, id="leading-space"),
        pytest.param(b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400, id="non-ascii-target"),
        pytest.param(b"GET /\x01 HTTP/1.1\r\n\r\n", 400, id="ctl-target"),
        pytest.param(b"GET / http/1.1\r\n\r\n", 400, id="lowercase-version"),
        pytest.param(b"GET / HTTP/1.10\r\n\r\n", 400, id="two-digit-minor"),
        pytest.param(b"GET / HTTP/11\r\n\r\n", 400, id="no-dot"),
        pytest.param(b"GET / HTTX/1.1\r\n\r\n", 400, id="bad-protocol"),
        pytest.param(b"GET / HTTP/2.0\r\n\r\n", 505, id="http2"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="h2-preface"),
        pytest.param(b"GET / HTTP/0.9\r\n\r\n", 505, id="http-0.9-versioned"),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", 400, id="binary-line"
        ),
    ],
)
def test_malformed_heads(
    split: Callable[[bytes], list[bytes]], data: bytes, status: int
) -> None:
    """Malformed heads raise HttpHeadError with the right status, however split."""
    with pytest.raises(HttpHeadError) as info:
        parse(split(data))
    assert info.value.status == status
    assert str(info.value).startswith(str(status))


# -- parse_proxy_target ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("example.com:443", ProxyTarget("connect", None, "example.com", 443, None)),
        ("EXAMPLE.com:1", ProxyTarget("connect", None, "example.com", 1, None)),
        ("10.0.0.1:65535", ProxyTarget("connect", None, "10.0.0.1", 65535, None)),
        ("[::1]:443", ProxyTarget("connect", None, "::1", 443, None)),
        (
            "[2001:DB8:0::1]:8443",
            ProxyTarget("connect", None, "2001:db8::1", 8443, None),
        ),
        (
            "my_host.internal:22",
            ProxyTarget("connect", None, "my_host.internal", 22, None),
        ),
    ],
)
def test_connect_targets(target: str, expected: ProxyTarget) -> None:
    """CONNECT authority-form targets yield host and port, IPv6 brackets stripped."""
    assert (
        parse_proxy_target(make_head("CONNECT", target, headers=[("Host", target)]))
        == expected
    )


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:99999999",
        "example.com:+80",
        "example.com:8o",
        ":443",
        "[::1]",
        "[::1]443",
        "[::1:443",
        "[::g]:443",
        "[fe80::1%25eth0]:443",
        "::1:443",
        "user@example.com:443",
        "example.com:443/",
        "http://example.com:443",
        "/path",
        "exa mple.com:443",
        "example.com:443#frag",
        "ex%41mple.com:443",
    ],
)
def test_bad_connect_targets(target: str) -> None:
    """Malformed CONNECT targets are 400."""
    with pytest.raises(HttpHeadError) as info:
        parse_proxy_target(make_head("CONNECT", target))
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://example.com", ProxyTarget("absolute", "http", "example.com", 80, "/")),
        (
            "http://example.com/",
            ProxyTarget("absolute", "http", "example.com", 80, "/"),
        ),
        (
            "HTTP://Example.COM:8080/a/b?c=d",
            ProxyTarget("absolute", "http", "example.com", 8080, "/a/b?c=d"),
        ),
        (
            "http://example.com?x=1",
            ProxyTarget("absolute", "http", "example.com", 80, "/?x=1"),
        ),
        (
            "http://example.com:/p",
            ProxyTarget("absolute", "http", "example.com", 80, "/p"),
        ),
        ("http://[::1]:8080/p", ProxyTarget("absolute", "http", "::1", 8080, "/p")),
        ("http://[::1]", ProxyTarget("absolute", "http", "::1", 80, "/")),
        (
            "http://192.0.2.1/x:y",
            ProxyTarget("absolute", "http", "192.0.2.1", 80, "/x:y"),
        ),
    ],
)
def test_absolute_targets(target: str, expected: ProxyTarget) -> None:
    """Absolute-form http targets yield host, port (default 80) and path (default /)."""
    assert parse_proxy_target(make_head("GET", target)) == expected


@pytest.mark.parametrize(
    "target",
    [
        "https://example.com/",
        "ftp://example.com/",
        "ws://example.com/",
        "http://",
        "http:///path",
        "http://user:pw@example.com/",
        "http://example.com/#frag",
        "http://example.com:0/",
        "http://example.com:x/",
        "http://[::1/",
        "http:/example.com/",
        "example.com:80",
        "example.com",
    ],
)
def test_bad_absolute_targets(target: str) -> None:
    """https, other schemes, userinfo, fragments and authority-form GETs are 400."""
    with pytest.raises(HttpHeadError) as info:
        parse_proxy_target(make_head("GET", target))
    assert info.value.status == 400


def test_origin_form_targets() -> None:
    """Origin-form and OPTIONS * are kind "origin" with only the path set."""
    assert parse_proxy_target(make_head("GET", "/a?b")) == ProxyTarget(
        "origin", None, None, None, "/a?b"
    )
    assert parse_proxy_target(make_head("OPTIONS", "*")) == ProxyTarget(
        "origin", None, None, None, "*"
    )


def test_asterisk_needs_options() -> None:
    """Asterisk-form with a method other than OPTIONS is 400."""
    with pytest.raises(HttpHeadError):
        parse_proxy_target(make_head("GET", "*"))


def test_multiple_host_fields_rejected() -> None:
    """More than one Host field is 400, a missing one is tolerated."""
    with pytest.raises(HttpHeadError) as info:
        parse_proxy_target(
            make_head("GET", "http://a/", headers=[("Host", "a"), ("host", "b")])
        )
    assert info.value.status == 400
    assert parse_proxy_target(make_head("CONNECT", "a:1", "HTTP/1.0")).host == "a"


def test_target_from_parsed_head() -> None:
    """parse_proxy_target works on a head produced by the parser."""
    head = head_of(
        b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\nHost: [2001:db8::5]:443\r\n\r\n"
    )
    assert parse_proxy_target(head) == ProxyTarget(
        "connect", None, "2001:db8::5", 443, None
    )


# -- body_framing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], ("none", 0)),
        ([("Content-Length", "0")], ("length", 0)),
        ([("Content-Length", "42")], ("length", 42)),
        ([("content-length", " 42 ")], ("length", 42)),
        ([("Content-Length", "7"), ("Content-Length", "7")], ("length", 7)),
        ([("Content-Length", "7, 7")], ("length", 7)),
        ([("Content-Length", "007")], ("length", 7)),
        ([("Transfer-Encoding", "chunked")], ("chunked", None)),
        ([("Transfer-Encoding", "Chunked")], ("chunked", None)),
        ([("transfer-encoding", " chunked ,")], ("chunked", None)),
    ],
)
def test_body_framing_accepted(
    headers: list[tuple[str, str]], expected: tuple[str, int | None]
) -> None:
    """Unambiguous framing is reported as none, length or chunked."""
    assert body_framing(make_head("POST", headers=headers)) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "0")],
        [("Content-Length", "3"), ("Content-Length", "4")],
        [("Content-Length", "3, 4")],
        [("Content-Length", "3,")],
        [("Content-Length", "")],
        [("Content-Length", "-1")],
        [("Content-Length", "+1")],
        [("Content-Length", "0x10")],
        [("Content-Length", "1 2")],
        [("Content-Length", "1" * 19)],
        [("Content-Length", "\u0663")],
        [("Transfer-Encoding", "gzip")],
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked, gzip")],
        [("Transfer-Encoding", "chunked, chunked")],
        [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "xchunked")],
        [("Transfer-Encoding", "chunked;q=1")],
        [("Transfer-Encoding", "")],
    ],
)
def test_body_framing_smuggling_rejected(headers: list[tuple[str, str]]) -> None:
    """Ambiguous or unsupported framing is 400 (RFC 9112 §6)."""
    with pytest.raises(HttpHeadError) as info:
        body_framing(make_head("POST", headers=headers))
    assert info.value.status == 400


def test_body_framing_te_in_http10_rejected() -> None:
    """Transfer-Encoding in an HTTP/1.0 request is 400."""
    with pytest.raises(HttpHeadError):
        body_framing(
            make_head(
                "POST", version="HTTP/1.0", headers=[("Transfer-Encoding", "chunked")]
            )
        )


# -- hop_by_hop_clean ---------------------------------------------------------------------

ALL_HOP = [
    ("Host", "example.com"),
    ("Connection", "keep-alive, X-Secret"),
    ("Proxy-Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-T"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic YTpi"),
    ("Proxy-Authenticate", "Basic"),
    ("X-Secret", "1"),
    ("x-secret", "2"),
    ("Transfer-Encoding", "chunked"),
    ("Accept", "*/*"),
]


def test_hop_by_hop_removed_in_order() -> None:
    """Hop-by-hop, proxy and Connection-named fields go; others stay in order."""
    assert hop_by_hop_clean(ALL_HOP, keep_upgrade=False) == [
        ("Host", "example.com"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]


def test_hop_by_hop_keep_upgrade() -> None:
    """keep_upgrade keeps Upgrade, even when Connection names it."""
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
    ]
    assert hop_by_hop_clean(headers, keep_upgrade=True) == [
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
    ]
    assert hop_by_hop_clean(headers, keep_upgrade=False) == [("Sec-WebSocket-Key", "k")]


def test_hop_by_hop_case_insensitive_and_multiple_connection_fields() -> None:
    """Names and tokens match case-insensitively across several Connection fields."""
    headers = [
        ("CONNECTION", "x-a"),
        ("connection", " X-B ,,"),
        ("X-A", "1"),
        ("x-b", "2"),
        ("X-C", "3"),
    ]
    assert hop_by_hop_clean(headers) == [("X-C", "3")]


def test_hop_by_hop_protects_framing_and_host() -> None:
    """Connection cannot remove Content-Length, Transfer-Encoding or Host."""
    headers = [
        ("Connection", "Content-Length, Transfer-Encoding, Host"),
        ("Host", "h"),
        ("Content-Length", "3"),
        ("Transfer-Encoding", "chunked"),
    ]
    assert hop_by_hop_clean(headers) == headers[1:]


def test_hop_by_hop_accepts_iterables() -> None:
    """Any iterable of pairs (e.g. head.headers, a generator) is accepted."""
    head = head_of(b"GET / HTTP/1.1\r\nConnection: close\r\nA: b\r\n\r\n")
    assert hop_by_hop_clean(head.headers) == [("A", "b")]
    assert hop_by_hop_clean(iter(head.headers)) == [("A", "b")]


# -- parse_basic_auth ---------------------------------------------------------------------


def b64(text: bytes) -> str:
    """Base64-encode to str."""
    return base64.b64encode(text).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Basic " + b64(b"alice:secret"), ("alice", "secret")),
        ("basic " + b64(b"alice:secret"), ("alice", "secret")),
        ("BASIC   " + b64(b"alice:secret") + " ", ("alice", "secret")),
        ("Basic " + b64(b"alice:se:cr:et"), ("alice", "se:cr:et")),
        ("Basic " + b64(b":"), ("", "")),
        ("Basic " + b64("jöhn:pässword".encode()), ("jöhn", "pässword")),
        ("Basic " + b64("jöhn:pässword".encode("latin-1")), ("jöhn", "pässword")),
    ],
)
def test_basic_auth_valid(value: str, expected: tuple[str, str]) -> None:
    """Well-formed Basic credentials decode to (user, password)."""
    assert parse_basic_auth(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer " + b64(b"alice:secret"),
        "Basicx " + b64(b"alice:secret"),
        "Basic " + b64(b"alicesecret"),
        "Basic !!!!",
        "Basic YWxpY2U6c2VjcmV",
        "Basic YWxp Y2U6",
        "Basic é",
        "Basic \x00",
    ],
)
def test_basic_auth_malformed_is_none(value: str | None) -> None:
    """Absent, other-scheme or malformed credentials give None, never an exception."""
    assert parse_basic_auth(value) is None


# -- properties ---------------------------------------------------------------------------

tokens = st.text(
    alphabet="!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=1,
    max_size=12,
)
values = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"
    ),
    max_size=30,
).map(lambda v: v.strip(" \t"))
targets = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    min_size=1,
    max_size=40,
)


@st.composite
def valid_heads(draw: st.DrawFn) -> tuple[bytes, RequestHead, bytes]:
    """A valid head (random terminators), the expected RequestHead and trailing bytes."""
    method = draw(tokens)
    target = draw(targets)
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    headers = draw(st.lists(st.tuples(tokens, values), max_size=10))
    eols = draw(
        st.lists(
            st.sampled_from([b"\r\n", b"\n"]),
            min_size=len(headers) + 2,
            max_size=len(headers) + 2,
        )
    )
    data = f"{method} {target} {version}".encode() + eols[0]
    for (name, value), eol in zip(headers, eols[1:-1], strict=True):
        ows = draw(st.sampled_from(["", " ", "\t ", "  "]))
        data += f"{name}:{ows}{value}{ows}".encode("latin-1") + eol
    data += eols[-1]
    tail = draw(st.binary(max_size=30))
    return data + tail, RequestHead(method, target, version, tuple(headers)), tail


def chunks_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split data at the given (unsorted, possibly repeated) cut points."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(valid_heads(), st.lists(st.integers(0, 2000), max_size=20))
def test_any_split_gives_same_head(
    case: tuple[bytes, RequestHead, bytes], cuts: list[int]
) -> None:
    """Arbitrary splits of a valid head give the same RequestHead and leftover."""
    data, expected, tail = case
    head, rest = parse(chunks_at(data, cuts))
    assert head == expected
    assert rest == tail


http_ish = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet="GETPOSTCONNECT HTTP/1.0:\r\n\t ab*?#[]@%", max_size=200).map(
        str.encode
    ),
    st.lists(
        st.sampled_from(
            [
                b"GET ",
                b"/ ",
                b"HTTP/1.1",
                b"\r\n",
                b"\n",
                b"\r",
                b"X: y",
                b" ",
                b":",
                b"\x00",
                b"\xff",
            ]
        ),
        max_size=30,
    ).map(b"".join),
)


@settings(max_examples=200, deadline=None)
@given(http_ish, st.lists(st.integers(0, 300), max_size=10))
def test_garbage_only_raises_httphead_error(data: bytes, cuts: list[int]) -> None:
    """Random input, arbitrarily split, returns None/a head or raises HttpHeadError only."""
    parser = RequestHeadParser(max_line=64, max_header_bytes=128, max_headers=4)
    try:
        head, _ = parse(chunks_at(data, cuts), parser)
    except HttpHeadError as e:
        assert e.status in (400, 414, 431, 505)
        return
    if head is not None:
        for helper in (parse_proxy_target, body_framing):
            try:
                helper(head)
            except HttpHeadError as e:
                assert e.status == 400
        hop_by_hop_clean(head.headers)
        parse_basic_auth(head.get("Proxy-Authorization"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["GET", "CONNECT", "OPTIONS"]), st.text(max_size=60))
def test_target_garbage_only_raises_httphead_error(method: str, target: str) -> None:
    """parse_proxy_target on random targets returns or raises HttpHeadError(400) only."""
    try:
        result = parse_proxy_target(make_head(method, target))
    except HttpHeadError as e:
        assert e.status == 400
        return
    if result.kind != "origin":
        assert result.port is not None and 1 <= result.port <= 65535


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Content-Length", "Transfer-Encoding", "X"]),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
def test_framing_garbage_only_raises_httphead_error(
    headers: list[tuple[str, str]],
) -> None:
    """body_framing on random fields returns a valid framing or raises HttpHeadError only."""
    try:
        kind, n = body_framing(make_head("POST", headers=headers))
    except HttpHeadError:
        return
    assert (kind == "chunked" and n is None) or (
        kind in ("none", "length") and isinstance(n, int) and n >= 0
    )


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=60),
        st.text(max_size=40).map(lambda s: "Basic " + s),
    )
)
def test_basic_auth_never_raises(value: str | None) -> None:
    """parse_basic_auth never raises on arbitrary text."""
    result = parse_basic_auth(value)
    assert result is None or (isinstance(result, tuple) and len(result) == 2)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20).filter(lambda s: ":" not in s), st.text(max_size=20))
def test_basic_auth_roundtrip(user: str, password: str) -> None:
    """Encoding user:password as UTF-8 Basic credentials decodes back to them."""
    assert parse_basic_auth("Basic " + b64(f"{user}:{password}".encode())) == (
        user,
        password,
    )


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.from_regex(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,12}", fullmatch=True), max_size=6),
    values=st.lists(st.binary(max_size=20), min_size=6, max_size=6),
    target=st.from_regex(r"/[!-~]{0,30}", fullmatch=True),
    limits=st.tuples(st.integers(20, 200), st.integers(10, 400), st.integers(1, 8)),
)
def test_one_piece_and_bytewise_parses_agree(
    names: list[str], values: list[bytes], target: str, limits: tuple[int, int, int]
) -> None:
    """A head fed whole (fast path) and byte by byte (line path) gives the same head, or both fail
    (an input both malformed and oversized may fail on either count first)."""
    fields = b"".join(n.encode() + b":" + v + b"\r\n" for n, v in zip(names, values, strict=False))
    data = b"GET " + target.encode() + b" HTTP/1.1\r\n" + fields + b"\r\nREST"

    def outcome(chunks: list[bytes]) -> object:
        parser = RequestHeadParser(max_line=limits[0], max_header_bytes=limits[1], max_headers=limits[2])
        try:
            for i, c in enumerate(chunks):
                head = parser.feed(c)
                if head is not None:
                    return head, parser.take_leftover() + b"".join(chunks[i + 1:])
        except HttpHeadError as e:
            return e.status
        return None

    whole, bytewise_ = outcome([data]), outcome(bytewise(data))
    if isinstance(whole, int) or isinstance(bytewise_, int):
        assert isinstance(whole, int) and isinstance(bytewise_, int)
    else:
        assert whole == bytewise_
