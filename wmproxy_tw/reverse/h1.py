"""Sans-IO pieces of the HTTP/1.1 server side: body decoders, path normalisation.

No sockets, no reactor.  The request head itself is parsed by
:class:`wmproxy_tw.forward.httphead.RequestHeadParser` (strict mode) and its
framing checked by :func:`~wmproxy_tw.forward.httphead.body_framing`; this
module decodes what follows the head:

* :class:`LengthDecoder` — ``Content-Length`` bodies;
* :class:`ChunkedDecoder` — ``Transfer-Encoding: chunked`` with bounded
  size lines (at most 16 hex digits: no 2**64 chunk sizes), CRLF only,
  bounded trailers, and the body-size cap checked at every size line.

Both ``feed(data) -> (chunks, done, leftover)``; errors raise
:class:`BodyError` carrying the status to answer (400 or 413).

The upstream (client) side: :func:`request_head` and :func:`chunk` frame
what is sent; :class:`ResponseParser` turns an upstream's bytes into
events (``(INFO, head)``, ``(RESPONSE, head)``, ``(DATA, bytes)``,
``(END, None)``) with the framing rules of RFC 9112 §6.3, strictly: a
response with both Content-Length and Transfer-Encoding, differing or
malformed lengths, obsolete line folding or an oversized head raise
:class:`ResponseError` (the proxy answers 502).  A head is parsed once per distinct
byte string (a bounded memo: an upstream repeats the same head many times a second).  (The forward proxy frames
with h11; on the reverse proxy's hot path h11 cost ~28 µs per exchange
against ~6 µs here, measured, so the upstream side has its own small parser.)
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

__all__ = [
    "BodyError", "LengthDecoder", "ChunkedDecoder", "normalize_path", "REASONS", "reason",
    "ResponseError", "ResponseHead", "ResponseParser", "request_head", "chunk", "LAST_CHUNK",
    "INFO", "RESPONSE", "DATA", "END",
]


class BodyError(Exception):
    """A malformed or oversized request body: ``status`` is 400 or 413."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class LengthDecoder:
    """A body of exactly ``length`` bytes."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> tuple[list[bytes], bool, bytes]:
        n = self.remaining
        if len(data) <= n:
            self.remaining = n - len(data)
            return ([data] if data else []), self.remaining == 0, b""
        self.remaining = 0
        return ([data[:n]] if n else []), True, data[n:]


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_EXT = re.compile(rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"[^\"\r\n]*\"))?)*[ \t]*")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """``Transfer-Encoding: chunked`` (RFC 9112 §7.1), strictly.

    ``max_size`` caps the decoded body (413 as soon as a size line would
    exceed it); ``max_line`` caps a size or trailer line; ``max_trailers``
    the trailer section.  Trailers are read and dropped.
    """

    def __init__(self, max_size: Optional[int] = None, max_line: int = 4096, max_trailers: int = 16384) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.max_trailers = max_trailers
        self.total = 0
        self._state = _SIZE
        self._line = bytearray()
        self._left = 0
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> tuple[list[bytes], bool, bytes]:
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                out.append(data[pos:pos + take] if (pos or take != end) else data)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DONE:
                break
            else:
                nl = data.find(b"\n", pos)
                stop = end if nl < 0 else nl + 1
                self._line += data[pos:stop]
                pos = stop
                if nl < 0:
                    if len(self._line) > self.max_line:
                        raise BodyError(400, "chunk line too long")
                    break
                line = bytes(self._line)
                self._line.clear()
                if not line.endswith(b"\r\n"):
                    raise BodyError(400, "bare LF in chunked body")
                self._line_done(line[:-2])
        return out, self._state == _DONE, (data[pos:] if self._state == _DONE and pos < end else b"")

    def _line_done(self, line: bytes) -> None:
        if len(line) > self.max_line:
            raise BodyError(400, "chunk line too long")
        if self._state == _DATA_END:
            if line:
                raise BodyError(400, "chunk data longer than its size")
            self._state = _SIZE
            return
        if self._state == _TRAILER:
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > self.max_trailers:
                raise BodyError(400, "trailer section too large")
            if not line:
                self._state = _DONE
            elif b"\r" in line or b":" not in line:
                raise BodyError(400, "malformed trailer field")
            return
        m = _HEX.match(line)
        if m is None:
            raise BodyError(400, "malformed chunk size")
        rest = line[m.end():]
        if rest[:1] and rest[:1] in b"0123456789abcdefABCDEF":
            raise BodyError(400, "chunk size too large")
        if rest and _EXT.fullmatch(rest) is None:
            raise BodyError(400, "malformed chunk extension")
        size = int(m.group(), 16)
        if size and self.max_size is not None and self.total + size > self.max_size:
            raise BodyError(413, "request body too large")
        self.total += size
        if size == 0:
            self._state = _TRAILER
        else:
            self._left = size
            self._state = _DATA



def normalize_path(raw: str) -> str:
    """The decoded, normalised path used for matching (nginx's ``$uri``).

    ``raw`` is the path part of the request-target (no query), as sent.
    Percent-escapes are decoded (the result is in Latin-1 clothing: one code
    point per byte), ``.`` and ``..`` segments resolved, repeated slashes
    merged.  Raises ValueError for a malformed escape, an encoded NUL, or
    ``..`` above the root.
    """
    if raw == "*":
        return "*"
    if not raw.startswith("/"):
        raise ValueError("path does not start with '/'")
    if "%" in raw:
        if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
            raise ValueError("malformed percent-escape in path")
        text = unquote_to_bytes(raw).decode("latin-1")
    else:
        text = raw
    if "\x00" in text:
        raise ValueError("NUL in path")
    if "/." not in text and "//" not in text:
        return text
    out: list[str] = []
    segments = text.split("/")
    for seg in segments[1:-1]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                raise ValueError("'..' above the root")
            out.pop()
            continue
        out.append(seg)
    last = segments[-1]
    trailing = ""
    if last == "..":
        if not out:
            raise ValueError("'..' above the root")
        out.pop()
        trailing = "/"
    elif last in ("", "."):
        trailing = "/"
    else:
        out.append(last)
    return "/" + "/".join(out) + (trailing if out else "")


REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content", 301: "Moved Permanently",
    302: "Found", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    414: "URI Too Long", 417: "Expectation Failed", 426: "Upgrade Required",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def reason(status: int) -> str:
    """The reason phrase of a status code (RFC 9110 names; "Unknown" for others)."""
    text = REASONS.get(status)
    if text is None:
        try:
            text = HTTPStatus(status).phrase
        except ValueError:
            text = "Unknown"
    return text


# -- the upstream side ------------------------------------------------------------------

INFO, RESPONSE, DATA, END = 1, 2, 3, 4
LAST_CHUNK = b"0\r\n\r\n"


def request_head(method: bytes, target: bytes, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request head.  ``headers`` hold only validated text: what
    the strict request parser accepted, configuration values (checked when
    loaded) and rule outputs (control characters removed)."""
    fields = "".join([f"{k}: {v}\r\n" for k, v in headers]).encode("latin-1")
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", fields, b"\r\n"))


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a chunked body."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


class ResponseError(Exception):
    """The upstream's answer is not acceptable HTTP/1.1."""


class ResponseHead:
    """A parsed status line and header section (names and values as sent)."""

    __slots__ = ("status", "reason", "version", "headers", "keep_alive")

    def __init__(self, status: int, reason_: bytes, version: bytes, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool) -> None:
        self.status = status
        self.reason = reason_
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive


_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")


def _head_problem(raw: bytes) -> str:
    """Why a response head failed the one-pass check (for the log)."""
    lines = raw.split(b"\n")
    first = lines[0].rstrip(b"\r")
    if _STATUS.fullmatch(first) is None:
        return f"bad status line {first[:80]!r}"
    for line in lines[1:]:
        line = line[:-1] if line.endswith(b"\r") else line
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding in the response head"
        if line and re.fullmatch(_TOKEN + rb":" + _TEXT + rb"*", line) is None:
            return f"bad header line {line[:80]!r}"
    return "control character in the response head"
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TEXT = rb"[^\x00-\x08\x0a-\x1f\x7f]"  # visible text, SP, HTAB and obs-text: no CR/LF/NUL/CTL
#: The status line alone, and the fields as whole lines: a head is well-formed exactly when
#: its status line matches and every line after it but the last (empty) one is a field line
#: (token name, colon, visible text), i.e. when there are as many matches as such lines.
#: Values come without surrounding blanks.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (" + _TEXT + rb"*))?\r?\n")
_FIELD_LINES = re.compile(rb"(?<=\n)(" + _TOKEN + rb"):[ \t]*((?:" + _TEXT + rb"*[^\x00-\x20\x7f])?)[ \t]*\r?\n")

_R_HEAD, _R_BODY, _R_DONE, _R_SWITCHED = range(4)
_CHUNKED, _LENGTH, _CLOSE = "chunked", "length", "close"
#: Parsed response heads by their exact bytes: an upstream repeats the same head (same
#: resource, same Date within a second) for many responses.  Bounded (cleared when full).
#: The parsed ResponseHead is shared: nobody modifies it (or its field list).
HEAD_CACHE = 512
_HEADS: dict[bytes, tuple["ResponseHead", str, int, Optional[str]]] = {}


def _parse_head(raw: bytes) -> tuple["ResponseHead", str, int, Optional[str]]:
    """What a response head says, independently of the request: the head, how its body
    is framed (chunked / length / close) and its length, and why that framing is
    unacceptable (None if it is fine; it only matters when a body can follow).
    ``raw`` ends at its first empty line (``_head_end``): the status line, then one
    pass over the field lines, counted.  ResponseError for a malformed head."""
    m = _STATUS_LINE.match(raw)
    if m is None:
        raise ResponseError(_head_problem(raw))
    fields_at = m.end()
    headers: list[tuple[bytes, bytes]] = _FIELD_LINES.findall(raw, fields_at)
    if len(headers) != raw.count(b"\n", fields_at) - 1:
        raise ResponseError(_head_problem(raw))
    te: list[bytes] = []
    cl: list[bytes] = []
    conn: list[bytes] = []
    for name, value in headers:
        if len(name) in (10, 14, 17):
            lname = name.lower()
            if lname == b"content-length":
                cl.append(value)
            elif lname == b"transfer-encoding":
                te.append(value)
            elif lname == b"connection":
                conn.append(value.lower())
    version = b"HTTP/1." + m.group(1)
    tokens = {t.strip(b" \t") for v in conn for t in v.split(b",")} if conn else ()
    keep = (b"close" not in tokens) if version == b"HTTP/1.1" else (b"keep-alive" in tokens)
    head = ResponseHead(int(m.group(2)), m.group(3) or b"", version, headers, keep)
    if te:
        if cl:
            return head, _CLOSE, 0, "response with both Content-Length and Transfer-Encoding"
        codings = [c.strip(b" \t").lower() for v in te for c in v.split(b",") if c.strip(b" \t")]
        if codings and codings[-1] == b"chunked":
            if codings != [b"chunked"]:
                return head, _CLOSE, 0, "unsupported transfer coding in the response"
            return head, _CHUNKED, 0, None
        return head, _CLOSE, 0, None
    if cl:
        values = {c.strip(b" \t") for v in cl for c in v.split(b",")}
        if len(values) != 1:
            return head, _CLOSE, 0, "conflicting Content-Length in the response"
        (text,) = values
        if not text.isdigit() or len(text) > 18:
            return head, _CLOSE, 0, "malformed Content-Length in the response"
        return head, _LENGTH, int(text), None
    return head, _CLOSE, 0, None



class ResponseParser:
    """One upstream connection's responses, one request at a time.

    Call :meth:`expect` before each request (``method`` decides whether a
    body can follow), then :meth:`feed` bytes and :meth:`eof` at end of
    input.  After ``END``, ``reusable`` says whether the connection can
    carry another request; after a ``101`` (``switched``), ``trailing``
    holds the bytes that belong to the new protocol.
    """

    def __init__(self, max_head: int = 64 * 1024, max_headers: int = 200) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self._state = _R_DONE
        self._buf = bytearray()
        self._scan = 0
        self._method = b"GET"
        self._body: Any = None
        self._until_close = False
        self.keep_alive = False
        self.trailing = b""

    @property
    def switched(self) -> bool:
        return self._state == _R_SWITCHED

    @property
    def done(self) -> bool:
        return self._state == _R_DONE

    @property
    def reusable(self) -> bool:
        return self._state == _R_DONE and self.keep_alive and not self.trailing

    def expect(self, method: bytes) -> None:
        self._state = _R_HEAD
        self._method = method
        self._buf = bytearray()
        self._scan = 0
        self.trailing = b""

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        events: list[tuple[int, Any]] = []
        state = self._state
        if state == _R_BODY:
            self._body_bytes(data, events)
            return events
        if state != _R_HEAD:
            self.trailing += data
            return events
        if self._buf:  # the rest of a head that came in pieces
            data = bytes(self._buf) + data
            self._buf = bytearray()
        pos = 0
        while self._state == _R_HEAD:
            end = self._head_end(data, pos)
            if end < 0:
                if len(data) - pos > self.max_head:
                    raise ResponseError(f"response head larger than {self.max_head} bytes")
                self._buf = bytearray(data[pos:])
                self._scan = len(self._buf)
                return events
            if end - pos > self.max_head:
                raise ResponseError(f"response head larger than {self.max_head} bytes")
            self._on_head(data[pos:end], events)
            pos = end
        if pos < len(data):
            rest = data[pos:]
            if self._state == _R_BODY:
                self._body_bytes(rest, events)
            else:
                self.trailing += rest
        return events

    def eof(self) -> list[tuple[int, Any]]:
        """The upstream closed: ends a close-delimited body, else ResponseError."""
        if self._state == _R_BODY and self._until_close:
            self._state = _R_DONE
            self.keep_alive = False
            return [(END, None)]
        if self._state in (_R_DONE, _R_SWITCHED):
            return []
        raise ResponseError("the upstream closed the connection before the response ended")

    def _head_end(self, data: bytes, pos: int) -> int:
        """Offset just after the empty line ending a head that starts at ``pos``, or -1."""
        start = max(pos, self._scan - 3)
        self._scan = 0
        crlf = data.find(b"\n\r\n", start)
        lf = data.find(b"\n\n", start, len(data) if crlf < 0 else crlf + 2)
        if lf >= 0:
            return lf + 2
        return crlf + 3 if crlf >= 0 else -1

    def _on_head(self, raw: bytes, events: list[tuple[int, Any]]) -> None:
        parsed = _HEADS.get(raw)
        if parsed is None:
            parsed = _parse_head(raw)
            if len(_HEADS) >= HEAD_CACHE:
                _HEADS.clear()
            _HEADS[raw] = parsed
        head, framing, length, problem = parsed
        if len(head.headers) > self.max_headers:
            raise ResponseError(f"more than {self.max_headers} response header fields")
        status = head.status
        if status < 200:
            if status == 101:
                self._state = _R_SWITCHED
                self.keep_alive = False
            events.append((INFO, head))
            return
        self.keep_alive = head.keep_alive
        events.append((RESPONSE, head))
        self._until_close = False
        if self._method == b"HEAD" or status in (204, 304):
            self._finish(events)
            return
        if problem is not None:
            raise ResponseError(problem)
        if framing is _CHUNKED:
            self._body = ChunkedDecoder()
        elif framing is _LENGTH:
            if length == 0:
                self._finish(events)
                return
            self._body = LengthDecoder(length)
        else:  # delimited by the end of the connection
            self._body = None
            self._until_close = True
            self.keep_alive = False
        self._state = _R_BODY

    def _finish(self, events: list[tuple[int, Any]]) -> None:
        self._state = _R_DONE
        self._body = None
        events.append((END, None))

    def _body_bytes(self, data: bytes, events: list[tuple[int, Any]]) -> None:
        if self._until_close:
            if data:
                events.append((DATA, data))
            return
        try:
            chunks, done, leftover = self._body.feed(data)
        except BodyError as e:
            raise ResponseError(f"bad response body: {e.message}") from None
        for c in chunks:
            events.append((DATA, c))
        if done:
            self._finish(events)
            if leftover:
                self.trailing += leftover
