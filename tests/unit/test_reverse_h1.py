"""Sans-IO HTTP/1.1 pieces of the reverse proxy: body decoders, path normalisation, response parser."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmproxy_tw.reverse.h1 import (
    DATA,
    END,
    INFO,
    RESPONSE,
    BodyError,
    ChunkedDecoder,
    LengthDecoder,
    ResponseError,
    ResponseParser,
    chunk,
    normalize_path,
    request_head,
)


def _feed_bytewise(dec: ChunkedDecoder | LengthDecoder, data: bytes) -> tuple[bytes, bool, bytes]:
    body, done, rest = b"", False, b""
    for i in range(len(data)):
        chunks, done, leftover = dec.feed(data[i:i + 1])
        body += b"".join(chunks)
        if done:
            rest = leftover + data[i + 1:]
            break
    return body, done, rest


CHUNKED = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"


def test_chunked_whole_and_bytewise() -> None:
    """A chunked body decodes the same fed at once or one byte at a time; what follows is left over."""
    chunks, done, rest = ChunkedDecoder().feed(CHUNKED)
    assert (b"".join(chunks), done, rest) == (b"hello world", True, b"NEXT")
    assert _feed_bytewise(ChunkedDecoder(), CHUNKED) == (b"hello world", True, b"NEXT")


@pytest.mark.parametrize("data,status", [
    (b"1" * 17 + b"\r\n", 400),              # 17 hex digits: oversized chunk size
    (b"fffffffffffffffff\r\n", 400),
    (b"-5\r\nhello\r\n", 400),
    (b"0x5\r\nhello\r\n", 400),
    (b" 5\r\nhello\r\n", 400),
    (b"5\nhello\r\n", 400),                   # bare LF
    (b"5\r\nhelloXX\r\n", 400),               # data longer than the size
    (b"5;\x01\r\nhello\r\n", 400),
    (b"0\r\nno colon\r\n\r\n", 400),
    (b"a" * 5000, 400),                       # size line never ends
])
def test_chunked_malformed_is_400(data: bytes, status: int) -> None:
    """Malformed or hostile chunk framing raises BodyError(400)."""
    with pytest.raises(BodyError) as e:
        ChunkedDecoder().feed(data)
    assert e.value.status == status


def test_chunked_size_cap_is_413_before_the_data() -> None:
    """A chunk that would exceed max_size fails at its size line."""
    dec = ChunkedDecoder(max_size=10)
    dec.feed(b"8\r\n12345678\r\n")
    with pytest.raises(BodyError) as e:
        dec.feed(b"3\r\n")
    assert e.value.status == 413


def test_length_decoder() -> None:
    """Content-Length bodies end exactly at the length."""
    assert _feed_bytewise(LengthDecoder(3), b"abcdef") == (b"abc", True, b"def")
    assert LengthDecoder(4).feed(b"ab") == ([b"ab"], False, b"")


@pytest.mark.parametrize("raw,norm", [
    ("/", "/"), ("/a/b", "/a/b"), ("/a//b", "/a/b"), ("/a/./b/", "/a/b/"), ("/a/../b", "/b"),
    ("/a/b/..", "/a/"), ("/%61%2Fb", "/a/b"), ("/a%20b", "/a b"), ("/a/%2e%2e/b", "/b"), ("/.x", "/.x"),
    ("/caf%C3%A9", "/caf\xc3\xa9"), ("*", "*"),
])
def test_normalize_path(raw: str, norm: str) -> None:
    """Paths are decoded and dot-segments resolved before matching (nginx's $uri)."""
    assert normalize_path(raw) == norm


@pytest.mark.parametrize("raw", ["/..", "/a/../..", "/%2e%2e/x", "/a%00b", "/a%zz", "/a%4", "x/y"])
def test_normalize_path_refuses(raw: str) -> None:
    """Climbing above the root, NUL and malformed escapes are refused."""
    with pytest.raises(ValueError):
        normalize_path(raw)


def _events(p: ResponseParser, data: bytes, bytewise: bool = False) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []
    if bytewise:
        for i in range(len(data)):
            out += p.feed(data[i:i + 1])
    else:
        out += p.feed(data)
    return out


def _body(events: list[tuple[int, object]]) -> bytes:
    return b"".join(v for k, v in events if k == DATA)  # type: ignore[misc]


@pytest.mark.parametrize("bytewise", [False, True])
def test_response_content_length_then_reuse(bytewise: bool) -> None:
    """A Content-Length response ends at its length and leaves the connection reusable."""
    p = ResponseParser()
    p.expect(b"GET")
    ev = _events(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", bytewise)
    head = ev[0][1]
    assert ev[0][0] == RESPONSE and head.status == 200 and head.reason == b"OK"  # type: ignore[attr-defined]
    assert head.headers == [(b"Content-Length", b"5"), (b"X-A", b"b")]  # type: ignore[attr-defined]
    assert _body(ev) == b"hello" and ev[-1] == (END, None) and p.reusable
    p.expect(b"GET")
    ev = _events(p, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", bytewise)
    assert [k for k, _ in ev] == [RESPONSE, END]


@pytest.mark.parametrize("bytewise", [False, True])
def test_response_chunked(bytewise: bool) -> None:
    """Chunked responses are de-chunked."""
    p = ResponseParser()
    p.expect(b"GET")
    ev = _events(p, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED[:-4], bytewise)
    assert _body(ev) == b"hello world" and ev[-1] == (END, None) and p.reusable


def test_response_until_close_and_no_body_cases() -> None:
    """No framing: body until EOF (not reusable); HEAD, 204 and 304 have no body; 1xx come first."""
    p = ResponseParser()
    p.expect(b"GET")
    ev = p.feed(b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert _body(ev) == b"abc" and not p.done
    assert p.eof() == [(END, None)] and not p.reusable
    for method, status in ((b"HEAD", 200), (b"GET", 204), (b"GET", 304)):
        p = ResponseParser()
        p.expect(method)
        ev = p.feed(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
        assert [k for k, _ in ev] == [RESPONSE, END] and p.reusable
    p = ResponseParser()
    p.expect(b"POST")
    ev = p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert [k for k, _ in ev] == [INFO, RESPONSE, DATA, END]


def test_response_101_keeps_the_rest() -> None:
    """After a 101, the bytes that follow belong to the new protocol."""
    p = ResponseParser()
    p.expect(b"GET")
    ev = p.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi")
    assert [k for k, _ in ev] == [INFO] and p.switched and p.trailing == b"\x81\x02hi"


def test_response_keep_alive_rules() -> None:
    """Connection: close and HTTP/1.0 without keep-alive make a connection single-use."""
    for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
        p = ResponseParser()
        p.expect(b"GET")
        p.feed(head)
        assert p.done and not p.reusable
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert p.reusable


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000,
])
def test_response_garbage_raises(data: bytes) -> None:
    """Ambiguous framing, non-HTTP/1.x status lines and oversized heads are errors (→ 502)."""
    p = ResponseParser()
    p.expect(b"GET")
    with pytest.raises(ResponseError):
        p.feed(data)


def test_response_eof_mid_body_is_an_error() -> None:
    """An upstream that closes inside a Content-Length body did not answer completely."""
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ResponseError):
        p.eof()


def test_request_framing_helpers() -> None:
    """Request heads and chunks are framed as HTTP/1.1 expects."""
    assert request_head(b"GET", b"/x", [("Host", "a"), ("X", "é")]) == b"GET /x HTTP/1.1\r\nHost: a\r\nX: \xe9\r\n\r\n"
    assert b"".join(chunk(b"hello")) == b"5\r\nhello\r\n"


# The one-regex check the parser used before it counted field lines (kept as the reference).
_TOKEN_RX = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TEXT_RX = rb"[^\x00-\x08\x0a-\x1f\x7f]"
_REFERENCE_HEAD = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (" + _TEXT_RX + rb"*))?\r?\n()(?:"
                             + _TOKEN_RX + rb":" + _TEXT_RX + rb"*\r?\n)*\r?\n")
_REFERENCE_FIELDS = re.compile(rb"(" + _TOKEN_RX + rb"):[ \t]*((?:" + _TEXT_RX + rb"*[^\x00-\x20\x7f])?)[ \t]*\r?\n")
_HEAD_BYTES = st.lists(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 404", b"HTTP/1.1 20", b"X", b"Set-Cookie",
                                        b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"\x00", b"\x7f", b"\xff",
                                        b"Bad Name", b"v", b"X-A: b"]), max_size=14).map(b"".join)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None)
@given(_HEAD_BYTES)
def test_response_head_check_matches_the_reference_regex(body: bytes) -> None:
    """Counting field lines accepts exactly the heads the whole-head regex accepted, with the same fields."""
    raw = body + b"\r\n\r\n"
    end = min(i for i in (raw.find(b"\n\r\n"), raw.find(b"\n\n")) if i >= 0)
    raw = raw[:end + (3 if raw[end:end + 3] == b"\n\r\n" else 2)]
    ref = _REFERENCE_HEAD.fullmatch(raw)
    p = ResponseParser()
    p.expect(b"HEAD")
    try:
        events = p.feed(raw)
    except ResponseError:
        assert ref is None
        return
    assert ref is not None
    head = events[0][1]
    assert head.headers == _REFERENCE_FIELDS.findall(raw, ref.end(4))


def test_repeated_response_heads_are_parsed_once_per_bytes() -> None:
    """The same head bytes are parsed once (shared, bounded cache); each parser keeps its own framing
    state, and a framing problem still only counts where a body can follow."""
    from wmproxy_tw.reverse import h1

    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Cached: yes\r\n\r\n"
    a, b = ResponseParser(), ResponseParser()
    a.expect(b"GET")
    b.expect(b"HEAD")
    ev_a = a.feed(raw + b"abc")
    ev_b = b.feed(raw)
    assert ev_a[0][1] is ev_b[0][1] and raw in h1._HEADS
    assert [k for k, _ in ev_a] == [RESPONSE, DATA, END] and [k for k, _ in ev_b] == [RESPONSE, END]
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    for method, fails in ((b"HEAD", False), (b"GET", True), (b"GET", True)):
        p = ResponseParser()
        p.expect(method)
        if fails:
            with pytest.raises(ResponseError):
                p.feed(bad)
        else:
            assert [k for k, _ in p.feed(bad)] == [RESPONSE, END]
    for i in range(h1.HEAD_CACHE + 5):
        p = ResponseParser()
        p.expect(b"HEAD")
        p.feed(b"HTTP/1.1 204 No Content\r\nX-N: %d\r\n\r\n" % i)
    assert len(h1._HEADS) <= h1.HEAD_CACHE
