"""Sans-IO HTTP/1.x request-head parser and helpers for the forward proxy.

No sockets, no reactor.  :class:`RequestHeadParser` turns bytes into a
:class:`RequestHead`; the helpers interpret it:

* :func:`parse_proxy_target` — CONNECT authority-form, ``http://`` absolute-form
  or origin-form (RFC 9112 §3.2);
* :func:`body_framing` — Content-Length / chunked, with the request-smuggling
  checks of RFC 9112 §6;
* :func:`hop_by_hop_clean` — drop hop-by-hop and proxy-only fields before
  forwarding (RFC 9110 §7.6.1);
* :func:`parse_basic_auth` — ``Proxy-Authorization: Basic`` credentials.

Every malformed input raises :class:`HttpHeadError` carrying the status to
answer (400, 414, 431, 505), except :func:`parse_basic_auth`, which returns None.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "HttpHeadError",
    "ProxyTarget",
    "RequestHead",
    "RequestHeadParser",
    "body_framing",
    "hop_by_hop_clean",
    "parse_basic_auth",
    "parse_proxy_target",
]

#: RFC 9110 §5.6.2 token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Field values: no CTL except HTAB (RFC 9110 §5.5 forbids CR, LF, NUL).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Request-target: visible ASCII only (RFC 3986 characters are all VCHAR).
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
#: reg-name as we accept it for upstream hosts: letters, digits, - . _ ~
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~]+")
_DIGITS = re.compile(r"[0-9]+")

#: Empty lines tolerated before the request-line (RFC 9112 §2.2: "at least one").
MAX_LEADING_EMPTY_LINES = 8

#: A complete, well-formed head in one piece (the common case), checked in one pass:
#: request-line, CRLF-terminated fields (token names, values without CTLs), empty line.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FAST_HEAD = re.compile(
    _TCHAR + rb"+ [\x21-\x7e]+ HTTP/1\.[0-9]\r\n((?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
#: One field of a head that passed _FAST_HEAD: name, value without surrounding blanks.
_FAST_FIELD = re.compile(
    rb"(" + _TCHAR + rb"+):[ \t]*((?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)[ \t]*\r\n"
)


class HttpHeadError(Exception):
    """A malformed or oversized request head.

    :ivar status: HTTP status to answer before closing: 400 bad request,
        414 request-line too long, 431 header line/section too large or too
        many fields, 505 unsupported HTTP major version.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head.

    Header names keep their original case; values are decoded as Latin-1
    (so obs-text round-trips byte for byte) with surrounding OWS stripped.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    #: lower-case name → values, built on the first lookup (a proxy looks up several fields per request)
    _index: dict[str, list[str]] | None = field(default=None, compare=False, repr=False)

    def _fields(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for key, value in self.headers:
                lname = key.lower()
                if lname in index:
                    index[lname].append(value)
                else:
                    index[lname] = [value]
            object.__setattr__(self, "_index", index)
        return index

    def get(self, name: str) -> str | None:
        """Value of the first field called ``name`` (case-insensitive), or None."""
        values = self._fields().get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Values of every field called ``name`` (case-insensitive), in order."""
        return list(self._fields().get(name.lower(), ()))


class RequestHeadParser:
    """Incremental parser for one request head (request-line + fields + CRLF).

    :meth:`feed` returns None until the head is complete, then the
    :class:`RequestHead`; :meth:`take_leftover` then returns the bytes after
    the head and resets the parser for the next request on the connection.

    Line terminators: CRLF, or a bare LF (RFC 9112 §2.2 allows recognising
    it; ``allow_bare_lf=False`` rejects it with 400, as a reverse proxy in
    front of other parsers should); a bare CR anywhere is rejected.  Limits fail as soon as they are
    exceeded, without waiting for the end of the line:

    * request-line longer than ``max_line`` → 414;
    * a field line longer than ``max_line``, or field lines totalling more
      than ``max_header_bytes`` (terminators included), → 431;
    * more than ``max_headers`` fields → 431.

    Up to ``MAX_LEADING_EMPTY_LINES`` empty lines before the request-line are
    ignored.  Line lengths exclude the terminator.
    """

    __slots__ = ("max_line", "max_header_bytes", "max_headers", "allow_bare_lf", "_buf", "_off", "_scan",
                 "_leading", "_request_line", "_headers", "_header_bytes", "_head", "_leftover")

    def __init__(
        self,
        max_line: int = 8192,
        max_header_bytes: int = 16384,
        max_headers: int = 100,
        allow_bare_lf: bool = True,
    ) -> None:
        self.max_line = max_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.allow_bare_lf = allow_bare_lf
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._off = 0  # start of the current (incomplete) line
        self._scan = 0  # where to resume looking for LF
        self._leading = 0
        self._request_line: tuple[str, str, str] | None = None
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._head: RequestHead | None = None
        self._leftover = b""

    @property
    def partial(self) -> bool:
        """True while part of a head is buffered (between heads: False)."""
        return bool(self._buf) or self._request_line is not None

    def feed(self, data: bytes) -> RequestHead | None:
        """Consume ``data``; return the head once complete, else None.

        Raises :class:`HttpHeadError` on malformed or oversized input, and
        RuntimeError if a head was returned and :meth:`take_leftover` has not
        been called since.
        """
        if self._head is not None:
            raise RuntimeError("head already complete: call take_leftover() first")
        if not self._buf and self._request_line is None and not self._leading:
            end = data.find(b"\r\n\r\n")
            if end > 0:
                fast = self._fast(data, end + 4)
                if fast is not None:
                    return fast
        buf = self._buf
        buf += data
        while True:
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(buf)
                self._check_partial()
                if self._off:
                    del buf[: self._off]
                    self._scan -= self._off
                    self._off = 0
                return None
            start = self._off
            self._off = self._scan = nl + 1
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            if end == nl and not self.allow_bare_lf:
                raise HttpHeadError(400, "bare LF in request head")
            line = bytes(buf[start:end])
            if b"\r" in line:
                raise HttpHeadError(400, "bare CR in request head")
            if self._request_line is None:
                self._on_request_line(line)
            elif line:
                self._on_field_line(line, nl + 1 - start)
            else:
                method, target, version = self._request_line
                self._head = RequestHead(method, target, version, tuple(self._headers))
                self._leftover = bytes(buf[self._off :])
                self._buf = bytearray()
                self._off = self._scan = 0
                return self._head

    def _fast(self, data: bytes, end: int) -> RequestHead | None:
        """The head ending at ``end`` if it is well-formed and within every limit;
        None sends it through the line-by-line path (which finds the precise error)."""
        m = _FAST_HEAD.fullmatch(data, 0, end)
        if m is None:
            return None
        start, stop = m.span(1)
        if start - 2 > self.max_line or stop - start > self.max_header_bytes:
            return None
        fields = _FAST_FIELD.findall(data, start, stop)
        if len(fields) > self.max_headers:
            return None
        if stop - start > self.max_line and max(map(len, data[start:stop].split(b"\r\n"))) > self.max_line:
            return None
        method, target, version = bytes(data[: start - 2]).split(b" ")
        head = RequestHead(
            method.decode("ascii"),
            target.decode("ascii"),
            version.decode("ascii"),
            tuple((k.decode("ascii"), v.decode("latin-1")) for k, v in fields),
        )
        self._head = head
        self._leftover = data[end:]
        return head

    def take_leftover(self) -> bytes:
        """Return the bytes after the completed head and reset for the next head.

        Before a head is complete this returns ``b""`` and changes nothing.
        """
        if self._head is None:
            return b""
        leftover = self._leftover
        self._reset()
        return leftover

    def _check_partial(self) -> None:
        """Fail early if the incomplete current line already breaks a limit."""
        partial = len(self._buf) - self._off
        if partial and self._buf[-1] == 0x0D:
            partial -= 1  # a CR that may yet be followed by LF
        if self._request_line is None:
            if partial > self.max_line:
                raise HttpHeadError(414, "request-line too long")
            # a method must be a token: bytes that cannot start a request (a SOCKS4 greeting, TLS,
            # binary noise) get their 400 now, not at the header deadline
            method = bytes(self._buf[self._off : self._off + min(partial, 32)]).split(b" ", 1)[0]
            if method.endswith(b"\r"):
                method = method[:-1]
            if method and not _TOKEN.fullmatch(method):
                raise HttpHeadError(400, "malformed request-line")
        else:
            if partial > self.max_line:
                raise HttpHeadError(431, "header line too long")
            if self._header_bytes + partial > self.max_header_bytes:
                raise HttpHeadError(431, "header section too large")

    def _on_request_line(self, line: bytes) -> None:
        if not line:
            self._leading += 1
            if self._leading > MAX_LEADING_EMPTY_LINES:
                raise HttpHeadError(400, "too many empty lines before the request-line")
            return
        if len(line) > self.max_line:
            raise HttpHeadError(414, "request-line too long")
        parts = line.split(b" ")
        if len(parts) != 3:
            raise HttpHeadError(400, "malformed request-line")
        method, target, version = parts
        match = _VERSION.fullmatch(version)
        if match is None:
            raise HttpHeadError(400, "malformed HTTP version")
        if match.group(1) != b"1":
            raise HttpHeadError(505, "HTTP version not supported")
        if _TOKEN.fullmatch(method) is None:
            raise HttpHeadError(400, "malformed method")
        if _TARGET.fullmatch(target) is None:
            raise HttpHeadError(400, "malformed request-target")
        self._request_line = (
            method.decode("ascii"),
            target.decode("ascii"),
            version.decode("ascii"),
        )

    def _on_field_line(self, line: bytes, raw_length: int) -> None:
        if len(line) > self.max_line:
            raise HttpHeadError(431, "header line too long")
        self._header_bytes += raw_length
        if self._header_bytes > self.max_header_bytes:
            raise HttpHeadError(431, "header section too large")
        if line[0] in b" \t":
            raise HttpHeadError(400, "obsolete line folding or leading whitespace")
        colon = line.find(b":")
        if colon <= 0:
            raise HttpHeadError(400, "malformed header line")
        name = line[:colon]
        if _TOKEN.fullmatch(name) is None:
            raise HttpHeadError(400, "malformed header name")
        value = line[colon + 1 :].strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise HttpHeadError(400, "control character in header value")
        self._headers.append((name.decode("ascii"), value.decode("latin-1")))
        if len(self._headers) > self.max_headers:
            raise HttpHeadError(431, "too many header fields")


# -- request-target ------------------------------------------------------------


@dataclass(frozen=True)
class ProxyTarget:
    """Where a proxy request goes.

    * ``kind == "connect"``: CONNECT ``host:port``; ``scheme`` and ``path`` None.
    * ``kind == "absolute"``: ``http://host[:port]/path?query``; scheme
      ``"http"``, port defaults to 80, ``path`` (path + query) defaults to "/".
    * ``kind == "origin"``: ``/path?query`` or ``*`` (OPTIONS only), i.e. not
      a proxy request; ``scheme``, ``host`` and ``port`` are None and the
      caller decides (e.g. by the Host field).

    ``host`` is lower-cased; IPv6 literals are given without brackets.
    """

    kind: str
    scheme: str | None
    host: str | None
    port: int | None
    path: str | None


def _parse_port(text: str, default: int | None) -> int:
    if text == "" and default is not None:
        return default
    if _DIGITS.fullmatch(text) is None or len(text) > 5:
        raise HttpHeadError(400, "malformed port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise HttpHeadError(400, "port out of range")
    return port


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; port required if no default."""
    if "@" in authority:
        raise HttpHeadError(400, "userinfo in request-target")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise HttpHeadError(400, "unterminated IPv6 literal")
        literal = authority[1:close]
        rest = authority[close + 1 :]
        if "%" in literal:
            raise HttpHeadError(400, "IPv6 zone identifier not allowed")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise HttpHeadError(400, "malformed IPv6 literal") from None
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise HttpHeadError(400, "garbage after IPv6 literal")
    else:
        host, sep, after = authority.rpartition(":")
        if sep:
            port_text = after
        else:
            host, port_text = authority, None
        if _REG_NAME.fullmatch(host) is None:
            raise HttpHeadError(400, "malformed host")
        host = host.lower()
    if port_text is None:
        if default_port is None:
            raise HttpHeadError(400, "port required")
        return host, default_port
    return host, _parse_port(port_text, default_port)


def parse_proxy_target(head: RequestHead) -> ProxyTarget:
    """Classify and parse ``head.target`` for a forward proxy.

    Raises HttpHeadError(400) for: CONNECT without a valid ``host:port``
    (port 1..65535 required); authority-form with another method; an
    absolute-form scheme other than ``http`` (``https://`` must use
    CONNECT); userinfo or a fragment in the target; ``*`` with a method other
    than OPTIONS; and more than one Host field (ambiguous routing).  A missing
    Host field is tolerated (old CONNECT clients omit it).
    """
    if len(head.get_all("Host")) > 1:
        raise HttpHeadError(400, "multiple Host fields")
    target = head.target
    if "#" in target:
        raise HttpHeadError(400, "fragment in request-target")
    if head.method == "CONNECT":
        if "/" in target or "?" in target:
            raise HttpHeadError(400, "CONNECT needs authority-form host:port")
        host, port = _parse_authority(target, None)
        return ProxyTarget("connect", None, host, port, None)
    if target.startswith("/"):
        return ProxyTarget("origin", None, None, None, target)
    if target == "*":
        if head.method != "OPTIONS":
            raise HttpHeadError(400, "asterisk-form is only for OPTIONS")
        return ProxyTarget("origin", None, None, None, target)
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HttpHeadError(400, "malformed request-target")
    scheme = scheme.lower()
    if scheme != "http":
        raise HttpHeadError(400, f"unsupported scheme {scheme!r} in absolute-form")
    cut = len(rest)
    for ch in "/?":
        pos = rest.find(ch)
        if 0 <= pos < cut:
            cut = pos
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise HttpHeadError(400, "empty authority")
    host, port = _parse_authority(authority, 80)
    if not path:
        path = "/"
    elif path.startswith("?"):
        path = "/" + path
    return ProxyTarget("absolute", "http", host, port, path)


# -- body framing ----------------------------------------------------------------


def body_framing(head: RequestHead) -> tuple[str, int | None]:
    """How the request body is delimited (RFC 9112 §6.3).

    Returns ``("none", 0)`` with neither field (no body), ``("length", n)``
    for Content-Length (n may be 0), or ``("chunked", None)``.  Raises
    HttpHeadError(400) for every ambiguous framing a smuggling attack would
    use: both fields present; Content-Length values that are not all-digit
    or disagree (``5, 5`` and repeated equal fields are accepted);
    Transfer-Encoding other than exactly ``chunked`` (a single coding); and
    Transfer-Encoding in an HTTP/1.0 request.
    """
    te_values = head.get_all("Transfer-Encoding")
    cl_values = head.get_all("Content-Length")
    if te_values and cl_values:
        raise HttpHeadError(400, "both Content-Length and Transfer-Encoding")
    if te_values:
        if head.version == "HTTP/1.0":
            raise HttpHeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(" \t").lower() for v in te_values for c in v.split(",")]
        codings = [c for c in codings if c]
        if codings != ["chunked"]:
            raise HttpHeadError(400, "unsupported Transfer-Encoding")
        return ("chunked", None)
    if cl_values:
        lengths = {c.strip(" \t") for v in cl_values for c in v.split(",")}
        if len(lengths) != 1:
            raise HttpHeadError(400, "conflicting Content-Length values")
        (text,) = lengths
        if _DIGITS.fullmatch(text) is None or len(text) > 18:
            raise HttpHeadError(400, "malformed Content-Length")
        return ("length", int(text))
    return ("none", 0)


# -- hop-by-hop ---------------------------------------------------------------------

#: Fields that concern one connection only (RFC 9110 §7.6.1), lower case.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
#: The same as bytes, with Transfer-Encoding (a proxy re-frames bodies itself).
HOP_BY_HOP_BYTES = frozenset(f.encode("ascii") for f in HOP_BY_HOP) | {b"transfer-encoding"}
#: Methods a proxy may send again when a connection failed before any answer (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_HOP_BY_HOP_KEEP_UPGRADE = HOP_BY_HOP - {"upgrade"}
#: Never removed because Connection names them: dropping framing or routing
#: fields while forwarding the body would desynchronise the upstream.
_PROTECTED = frozenset({"content-length", "transfer-encoding", "host"})


def hop_by_hop_clean(
    headers: Iterable[tuple[str, str]], keep_upgrade: bool = False
) -> list[tuple[str, str]]:
    """Return ``headers`` without hop-by-hop and proxy-only fields.

    Removes Connection, Proxy-Connection, Keep-Alive, TE, Trailer, Upgrade
    (kept when ``keep_upgrade``; the caller then re-adds ``Connection:
    Upgrade``), Proxy-Authorization, Proxy-Authenticate, and every field
    named by a Connection token.  Transfer-Encoding is kept on purpose: the
    body is forwarded with its framing unchanged, so the upstream needs it
    (see :func:`body_framing`).  Content-Length, Transfer-Encoding and Host
    are never removed via Connection tokens.
    """
    headers = list(headers)
    lowered = [name.lower() for name, _ in headers]
    drop: frozenset[str] | set[str] = _HOP_BY_HOP_KEEP_UPGRADE if keep_upgrade else HOP_BY_HOP
    if "connection" in lowered:
        drop = set(drop)
        for lname, (_, value) in zip(lowered, headers, strict=True):
            if lname == "connection":
                for token in value.split(","):
                    token = token.strip(" \t").lower()
                    if token and _TOKEN_STR.fullmatch(token) and token not in _PROTECTED:
                        drop.add(token)
        if keep_upgrade:
            drop.discard("upgrade")
    elif drop.isdisjoint(lowered):
        return headers  # the common case: nothing to drop
    return [pair for pair, lname in zip(headers, lowered, strict=True) if lname not in drop]


# -- credentials -----------------------------------------------------------------


def parse_basic_auth(value: str | None) -> tuple[str, str] | None:
    """Decode ``Basic base64(user:pass)`` credentials; None if absent or malformed.

    The scheme is case-insensitive; the base64 must be canonical (alphabet
    and padding checked).  Credentials are decoded as UTF-8, falling back to
    Latin-1.  Never raises.
    """
    if not value:
        return None
    scheme, _, token = value.strip(" \t").partition(" ")
    if scheme.lower() != "basic":
        return None
    token = token.strip(" \t")
    if not token:
        return None
    try:
        raw = base64.b64decode(token.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password
