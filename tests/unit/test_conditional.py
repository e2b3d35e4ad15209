"""Validators, conditional requests, Range and Accept-Encoding parsing (sans-IO)."""

from __future__ import annotations

import pytest

from wmproxy_tw.reverse.conditional import (
    accepted_encodings,
    etag_matches,
    http_date,
    if_range_allows,
    make_etag,
    parse_http_date,
    parse_range,
    preconditions,
)

SIZE = 1000


@pytest.mark.parametrize("header,expected", [
    (None, (200, 0, 0)),
    ("bytes=0-0", (206, 0, 1)),
    ("bytes=0-99", (206, 0, 100)),
    ("bytes=100-", (206, 100, 1000)),
    ("bytes=-100", (206, 900, 1000)),
    ("bytes=-5000", (206, 0, 1000)),
    ("bytes=990-5000", (206, 990, 1000)),
    ("bytes= 5 - 9 ", (206, 5, 10)),
    ("BYTES=1-2", (206, 1, 3)),
    ("bytes=1000-", (416, 0, 0)),
    ("bytes=5000-6000", (416, 0, 0)),
    ("bytes=-0", (416, 0, 0)),
    ("bytes=9-5", (416, 0, 0)),
    ("bytes=abc", (416, 0, 0)),
    ("bytes=1-x", (416, 0, 0)),
    ("bytes=", (416, 0, 0)),
    ("bytes=99999999999999999999999-", (416, 0, 0)),
    ("items=0-5", (200, 0, 0)),
    ("bytes=0-1,5-6", (200, 0, 0)),
    ("bytes=0-1,5000-6000", (206, 0, 2)),
    ("bytes=0-999,0-999", (200, 0, 0)),
])
def test_parse_range_like_nginx(header: str | None, expected: tuple[int, int, int]) -> None:
    """Each Range form decides 200/206/416 (and the byte span) as nginx's range filter does."""
    r = parse_range(header, SIZE)
    assert (r.status, r.start, r.end) == expected


def test_range_of_empty_file_is_full() -> None:
    """``bytes=0-`` and ``bytes=-0`` of an empty file answer the (empty) whole file."""
    assert parse_range("bytes=0-", 0).status == 200
    assert parse_range("bytes=-0", 0).status == 200
    assert parse_range("bytes=1-", 0).status == 416


def test_content_range_text() -> None:
    """Content-Range is ``bytes S-E/SIZE`` for 206 and ``bytes */SIZE`` for 416."""
    assert parse_range("bytes=-10", SIZE).content_range(SIZE) == "bytes 990-999/1000"
    assert parse_range("bytes=2000-", SIZE).content_range(SIZE) == "bytes */1000"


def test_etag_and_dates() -> None:
    """ETags are quoted like nginx's (hex mtime-size); dates round-trip; junk is no date."""
    assert make_etag(0x5F5E1000, 0x1F) == '"5f5e1000-1f"'
    assert make_etag(1, 2, weak=True) == 'W/"1-2"'
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert parse_http_date("not a date") is None
    assert parse_http_date("") is None


def test_etag_comparison() -> None:
    """If-None-Match compares weakly (lists, *), If-Match strongly (never a weak tag)."""
    assert etag_matches('"a", "b"', '"b"', weak=True)
    assert etag_matches('W/"b"', '"b"', weak=True)
    assert etag_matches("*", '"x"', weak=True)
    assert not etag_matches('"c"', '"b"', weak=True)
    assert not etag_matches('W/"b"', '"b"', weak=False)
    assert etag_matches('"b"', '"b"', weak=False)


def test_preconditions_order() -> None:
    """304 on a matching If-None-Match or an old-enough If-Modified-Since; 412 on
    failing If-Match/If-Unmodified-Since; If-None-Match overrides If-Modified-Since."""
    tag, mtime = '"1-2"', 784111777
    date = "Sun, 06 Nov 1994 08:49:37 GMT"
    older = "Sat, 05 Nov 1994 08:49:37 GMT"
    assert preconditions("GET", {}, tag, mtime) is None
    assert preconditions("GET", {"if-none-match": tag}, tag, mtime) == 304
    assert preconditions("HEAD", {"if-none-match": tag}, tag, mtime) == 304
    assert preconditions("GET", {"if-none-match": '"x"'}, tag, mtime) is None
    assert preconditions("GET", {"if-modified-since": date}, tag, mtime) == 304
    assert preconditions("GET", {"if-modified-since": older}, tag, mtime) is None
    assert preconditions("GET", {"if-modified-since": "garbage"}, tag, mtime) is None
    assert preconditions("GET", {"if-none-match": '"x"', "if-modified-since": date}, tag, mtime) is None
    assert preconditions("GET", {"if-match": '"x"'}, tag, mtime) == 412
    assert preconditions("GET", {"if-match": tag}, tag, mtime) is None
    assert preconditions("GET", {"if-unmodified-since": older}, tag, mtime) == 412
    assert preconditions("GET", {"if-unmodified-since": date}, tag, mtime) is None


def test_if_range() -> None:
    """If-Range lets the range through only for the current strong ETag or exact date."""
    tag, mtime = '"1-2"', 784111777
    assert if_range_allows(None, tag, mtime)
    assert if_range_allows(tag, tag, mtime)
    assert not if_range_allows('"old"', tag, mtime)
    assert not if_range_allows('W/"1-2"', tag, mtime)
    assert if_range_allows("Sun, 06 Nov 1994 08:49:37 GMT", tag, mtime)
    assert not if_range_allows("Sat, 05 Nov 1994 08:49:37 GMT", tag, mtime)
    assert not if_range_allows(tag, 'W/"1-2"', mtime)


def test_accept_encoding() -> None:
    """Codings with their q; q=0 removes; * stands for gzip and br; junk q counts as 0."""
    assert accepted_encodings(None) == {}
    assert accepted_encodings("gzip, deflate, br") == {"gzip": 1.0, "deflate": 1.0, "br": 1.0}
    assert accepted_encodings("gzip;q=0, br;q=0.5") == {"br": 0.5}
    assert accepted_encodings("*") == {"*": 1.0, "gzip": 1.0, "br": 1.0}
    assert accepted_encodings("GZIP;q=abc") == {}
