"""HTTP validators, conditional requests and byte ranges, without I/O.

Pure functions on header values, so the file server (and anything else that
serves representations with validators) decides 200/206/304/412/416 the same
way.  Range parsing follows nginx's range filter, so responses can be checked
byte for byte against nginx serving the same folder:

* ``bytes=N-M``, ``bytes=N-`` and the suffix form ``bytes=-N``; spaces allowed;
* a range starting at or past the end is skipped; if none is left: 416;
* a single satisfiable range gives 206; several give the full 200 response
  (allowed by RFC 9110 §14.2: a server may ignore ``Range``);
* anything that is not ``bytes=...`` is ignored (200).
"""

from __future__ import annotations

import calendar
import email.utils
import functools
from dataclasses import dataclass

__all__ = [
    "RangeResult",
    "accepted_encodings",
    "etag_matches",
    "http_date",
    "if_range_allows",
    "make_etag",
    "parse_http_date",
    "parse_range",
    "preconditions",
]

_MAX_DIGITS = 19  # offsets beyond 2**63 are nonsense; refuse instead of building huge ints


def make_etag(mtime: float, size: int, weak: bool = False) -> str:
    """nginx's validator: ``"<mtime hex>-<size hex>"`` (quoted; ``W/`` when weak)."""
    tag = f'"{int(mtime):x}-{size:x}"'
    return "W/" + tag if weak else tag


@functools.lru_cache(maxsize=4096)
def _http_date(ts: int) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def http_date(ts: float) -> str:
    """An IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    return _http_date(int(ts))


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch, or None when the value is not a date."""
    try:
        parts = email.utils.parsedate_tz(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parts is None:
        return None
    try:
        ts = calendar.timegm(parts[:9]) - (parts[9] or 0)
    except (OverflowError, ValueError):
        return None
    return int(ts)


def _tags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _opaque(tag: str) -> str:
    return tag.removeprefix("W/")


def etag_matches(header: str, etag: str, weak: bool) -> bool:
    """Does the list in ``If-None-Match``/``If-Match`` name ``etag``?

    ``weak`` selects the weak comparison (If-None-Match); the strong one
    (If-Match) never matches a weak validator.
    """
    if header.strip() == "*":
        return True
    for tag in _tags(header):
        if weak:
            if _opaque(tag) == _opaque(etag):
                return True
        elif not tag.startswith("W/") and not etag.startswith("W/") and tag == etag:
            return True
    return False


def preconditions(method: str, headers: dict[str, str], etag: str, mtime: int) -> int | None:
    """The status decided by validators (412 or 304), or None to serve normally.

    ``headers`` maps lower-case names to values.  Order and precedence as in
    RFC 9110 §13.2.2: If-Match, If-Unmodified-Since, If-None-Match, then
    If-Modified-Since (only when there is no If-None-Match, for GET/HEAD).
    """
    im = headers.get("if-match")
    if im is not None:
        if not etag_matches(im, etag, weak=False):
            return 412
    else:
        ius = headers.get("if-unmodified-since")
        if ius is not None:
            t = parse_http_date(ius)
            if t is not None and mtime > t:
                return 412
    inm = headers.get("if-none-match")
    if inm is not None:
        if etag_matches(inm, etag, weak=True):
            return 304 if method in ("GET", "HEAD") else 412
        return None
    ims = headers.get("if-modified-since")
    if ims is not None and method in ("GET", "HEAD"):
        t = parse_http_date(ims)
        if t is not None and mtime <= t:
            return 304
    return None


def if_range_allows(value: str | None, etag: str, mtime: int) -> bool:
    """``If-Range``: the range applies only if the validator is still current
    (strong ETag equality, or the exact Last-Modified date)."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return not etag.startswith("W/") and value == etag
    t = parse_http_date(value)
    return t is not None and t == mtime


@dataclass(frozen=True)
class RangeResult:
    """``status`` 200 (serve all), 206 (``start``..``end`` exclusive) or 416."""

    status: int
    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        if self.status == 416:
            return f"bytes */{size}"
        return f"bytes {self.start}-{self.end - 1}/{size}"


_FULL = RangeResult(200)
_UNSATISFIABLE = RangeResult(416)


def _number(text: str, i: int) -> tuple[int | None, int]:
    j = i
    while j < len(text) and text[j].isdigit() and text[j].isascii():
        j += 1
    if j == i or j - i > _MAX_DIGITS:
        return None, j
    return int(text[i:j]), j


def _spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] == " ":
        i += 1
    return i


def parse_range(header: str | None, size: int) -> RangeResult:
    """Decide a ``Range`` header against a representation of ``size`` bytes."""
    if header is None:
        return _FULL
    if header[:6].lower() != "bytes=":
        return _FULL
    text, i = header[6:], 0
    ranges: list[tuple[int, int]] = []
    total = 0
    while True:
        i = _spaces(text, i)
        if i < len(text) and text[i] == "-":
            suffix_len, i = _number(text, i + 1)
            if suffix_len is None:
                return _UNSATISFIABLE
            start, end = max(size - suffix_len, 0), size
        else:
            start_n, i = _number(text, i)
            if start_n is None:
                return _UNSATISFIABLE
            i = _spaces(text, i)
            if i >= len(text) or text[i] != "-":
                return _UNSATISFIABLE
            i = _spaces(text, i + 1)
            start = start_n
            if i >= len(text) or text[i] == ",":
                end = size
            else:
                last, i = _number(text, i)
                if last is None:
                    return _UNSATISFIABLE
                end = min(last + 1, size)
        i = _spaces(text, i)
        if i < len(text) and text[i] != ",":
            return _UNSATISFIABLE
        if start < end:
            ranges.append((start, end))
            total += end - start
        elif start == 0:
            return _FULL  # e.g. "bytes=0-" of an empty file, or "bytes=-0" of one
        if i >= len(text):
            break
        i += 1  # past ","
    if not ranges:
        return _UNSATISFIABLE
    if len(ranges) > 1 or total > size:
        return _FULL
    start, end = ranges[0]
    return RangeResult(206, start, end)


def accepted_encodings(header: str | None) -> dict[str, float]:
    """``Accept-Encoding`` as {coding: q}; codings with q=0 are left out."""
    out: dict[str, float] = {}
    if not header:
        return out
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";")]
        coding = parts[0].lower()
        if not coding:
            continue
        q = 1.0
        for p in parts[1:]:
            if p[:2].lower() == "q=":
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            out[coding] = q
        else:
            out.pop(coding, None)
    if "*" in out:
        for c in ("gzip", "br"):
            out.setdefault(c, out["*"])
    return out
