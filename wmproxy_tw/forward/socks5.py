"""Sans-IO SOCKS5 server-side handshake (RFC 1928, RFC 1929).

No sockets, no reactor: the protocol layer feeds received bytes to
:class:`Socks5Server` and acts on the returned events.

Typical use::

    server = Socks5Server(auth_required=True, check_credentials=check)
    try:
        events = server.feed(data)
    except Socks5Error as e:
        transport.write(e.response)   # may be b""
        transport.loseConnection()
        return
    for ev in events:
        if isinstance(ev, SendBytes):
            transport.write(ev.data)
        elif isinstance(ev, AuthFailed):
            transport.loseConnection()  # after writing the SendBytes before it
        elif isinstance(ev, Request):
            ...  # connect upstream; then transport.write(server.reply(0, host, port))
                 # and relay server.take_leftover() upstream first

Limits: every handshake message is length-prefixed, so one message is at most
513 bytes and a whole handshake (greeting + auth + request) at most
``MAX_HANDSHAKE`` (1032) bytes; the parser never buffers more than one
incomplete message.  Bytes received after the request (pipelined client data,
e.g. a TLS ClientHello) are kept for :meth:`Socks5Server.take_leftover`, capped
at ``max_pending`` bytes.

The module also holds the UDP ASSOCIATE datagram header helpers
:func:`parse_udp_datagram` and :func:`build_udp_datagram`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "MAX_HANDSHAKE",
    "REP_ADDRESS_TYPE_NOT_SUPPORTED",
    "REP_COMMAND_NOT_SUPPORTED",
    "REP_CONNECTION_NOT_ALLOWED",
    "REP_CONNECTION_REFUSED",
    "REP_GENERAL_FAILURE",
    "REP_HOST_UNREACHABLE",
    "REP_NETWORK_UNREACHABLE",
    "REP_SUCCEEDED",
    "REP_TTL_EXPIRED",
    "AuthFailed",
    "Request",
    "SendBytes",
    "Socks5Error",
    "Socks5Event",
    "Socks5Server",
    "UdpDatagram",
    "build_reply",
    "build_udp_datagram",
    "parse_udp_datagram",
]

SOCKS_VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_CONNECTION_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: Largest possible well-formed handshake: greeting (2 + 255) + auth
#: (3 + 255 + 255) + request (5 + 255 + 2).
MAX_HANDSHAKE = 257 + 513 + 262

_AUTH_OK = bytes([AUTH_VERSION, 0x00])
_AUTH_FAIL = bytes([AUTH_VERSION, 0x01])
_NO_ACCEPTABLE = bytes([SOCKS_VERSION, METHOD_NO_ACCEPTABLE])


class Socks5Error(Exception):
    """A fatal handshake error: write :attr:`response`, then close.

    :ivar reply: the SOCKS reply code carried by the response: a request
        reply code (``REP_*``), ``0xFF`` for a method-selection rejection
        ("no acceptable methods"), or ``None`` when nothing of the failing
        message is answered (bad version byte, malformed datagram, ...).
    :ivar response: every byte the caller must write before closing.  When
        :meth:`Socks5Server.feed` raises, this includes replies produced
        earlier in the same call (e.g. the method selection for a greeting
        pipelined with a bad request), since those events are never returned.
        May be ``b""``.
    """

    def __init__(
        self, message: str, reply: int | None = None, response: bytes = b""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply
        self.response = response


@dataclass(frozen=True)
class SendBytes:
    """Bytes (method selection or auth status) the caller must write now."""

    data: bytes


@dataclass(frozen=True)
class AuthFailed:
    """Credentials were rejected: write the preceding SendBytes, then close."""


@dataclass(frozen=True)
class Request:
    """The client's request; the server now awaits :meth:`Socks5Server.reply`.

    :ivar cmd: ``CMD_CONNECT``, ``CMD_BIND`` or ``CMD_UDP_ASSOCIATE``.  BIND is
        reported like the others; the caller answers ``REP_COMMAND_NOT_SUPPORTED``.
    :ivar host: textual IPv4/IPv6 address, or a domain name (ASCII; non-ASCII
        names are converted to their IDNA A-label form).  A domain may itself
        look like an IP literal: ``atyp`` says what the client sent.
    :ivar port: 0..65535 as sent (UDP ASSOCIATE often sends 0.0.0.0:0;
        a CONNECT to port 0 is the caller's to refuse).
    :ivar atyp: ``ATYP_IPV4``, ``ATYP_DOMAIN`` or ``ATYP_IPV6``.
    """

    cmd: int
    host: str
    port: int
    atyp: int


Socks5Event = SendBytes | AuthFailed | Request


@dataclass(frozen=True)
class UdpDatagram:
    """A parsed SOCKS5 UDP request header plus payload (RFC 1928 §7).

    ``frag != 0`` means a fragment: this implementation does not reassemble,
    so the caller must drop such datagrams (RFC 1928 allows not supporting
    fragmentation).
    """

    frag: int
    host: str
    port: int
    payload: bytes
    atyp: int


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    AWAIT_REPLY = "awaiting reply"
    ESTABLISHED = "established"
    CLOSED = "closed"


def _decode_domain(raw: bytes) -> str:
    """Decode a DST.ADDR domain; raise ValueError if empty or not printable.

    Printable ASCII (no spaces) is returned as-is; UTF-8 names are converted
    to their IDNA A-label ("xn--") form.
    """
    if not raw:
        raise ValueError("empty domain name")
    if all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("domain name is neither ASCII nor UTF-8") from None
    if not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError("domain name has non-printable characters")
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("domain name is not valid IDNA") from None


def _encode_address(host: str, allow_domain: bool) -> bytes:
    """Encode ``ATYP + ADDR`` for an IP literal (or a domain if allowed)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not allow_domain:
            raise ValueError(f"not an IP address: {host!r}") from None
        try:
            raw = host.encode("ascii") if host.isascii() else host.encode("idna")
        except UnicodeError:
            raise ValueError(f"not an encodable domain: {host!r}") from None
        if not 0 < len(raw) <= 255:
            raise ValueError(f"domain length out of range: {host!r}") from None
        return bytes([ATYP_DOMAIN, len(raw)]) + raw
    if ip.version == 4:
        return bytes([ATYP_IPV4]) + ip.packed
    return bytes([ATYP_IPV6]) + ip.packed


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")


def build_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """Build a request reply ``VER REP RSV ATYP BND.ADDR BND.PORT``.

    ``bind_host`` must be an IPv4 or IPv6 literal; the address type follows
    from it.  Raises ValueError on a bad code, host or port.
    """
    if not 0 <= code <= 0xFF:
        raise ValueError(f"reply code out of range: {code}")
    _check_port(bind_port)
    return (
        bytes([SOCKS_VERSION, code, 0x00])
        + _encode_address(bind_host, False)
        + bind_port.to_bytes(2, "big")
    )


class Socks5Server:
    """Server side of one SOCKS5 handshake, as a state machine.

    States: greeting → (auth) → request → awaiting reply → established.
    :meth:`feed` returns events (:class:`SendBytes`, :class:`AuthFailed`,
    :class:`Request`) or raises :class:`Socks5Error`.  It accepts any split of
    the input: one byte at a time, or greeting, auth, request and pipelined
    data all at once.  After an error or :class:`AuthFailed` the machine is
    closed and further input is discarded.

    :param auth_required: require RFC 1929 username/password (method 0x02);
        otherwise only "no authentication" (0x00) is accepted.
    :param check_credentials: ``(username, password) -> bool``; required when
        ``auth_required``.  It must not block; its exceptions propagate
        out of :meth:`feed`.
    :param max_pending: cap on bytes held for :meth:`take_leftover` while
        awaiting the reply; the caller should pause the transport meanwhile.
    """

    def __init__(
        self,
        auth_required: bool,
        check_credentials: Callable[[bytes, bytes], bool] | None = None,
        *,
        max_pending: int = 256 * 1024,
    ) -> None:
        if auth_required and check_credentials is None:
            raise ValueError("auth_required needs check_credentials")
        self._auth_required = auth_required
        self._check = check_credentials
        self._max_pending = max_pending
        self._buf = bytearray()
        self._off = 0
        self._state = _State.GREETING
        #: The authenticated username (RFC 1929), once accepted; else None.
        self.username: bytes | None = None
        #: The parsed request, once received; else None.
        self.request: Request | None = None

    @property
    def state(self) -> str:
        """Current state name: greeting, auth, request, awaiting reply, established, closed."""
        return self._state.value

    # -- input ---------------------------------------------------------------

    def feed(self, data: bytes) -> list[Socks5Event]:
        """Consume ``data``; return the events it completes (maybe none).

        Raises :class:`Socks5Error` on a protocol violation (see its
        ``response``).  Raises RuntimeError if called after a successful
        :meth:`reply`: from then on the bytes belong to the relay.
        """
        state = self._state
        if state is _State.CLOSED:
            return []
        if state is _State.ESTABLISHED:
            raise RuntimeError("SOCKS5 handshake already established")
        self._buf += data
        events: list[Socks5Event] = []
        try:
            while self._state not in (_State.AWAIT_REPLY, _State.CLOSED):
                if not self._step(events):
                    break
            if (
                self._state is _State.AWAIT_REPLY
                and len(self._buf) - self._off > self._max_pending
            ):
                raise Socks5Error("too much data before the SOCKS5 reply")
        except Socks5Error as e:
            self._close()
            sent = b"".join(ev.data for ev in events if isinstance(ev, SendBytes))
            e.response = sent + e.response
            raise
        if self._state is _State.CLOSED:
            self._close()
        elif self._off:
            del self._buf[: self._off]
            self._off = 0
        return events

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._buf = bytearray()
        self._off = 0

    def _avail(self) -> int:
        return len(self._buf) - self._off

    def _step(self, events: list[Socks5Event]) -> bool:
        """Parse one message if complete; return False when more bytes are needed."""
        if self._state is _State.GREETING:
            return self._parse_greeting(events)
        if self._state is _State.AUTH:
            return self._parse_auth(events)
        return self._parse_request(events)

    def _parse_greeting(self, events: list[Socks5Event]) -> bool:
        buf, off, avail = self._buf, self._off, self._avail()
        if avail < 1:
            return False
        if buf[off] != SOCKS_VERSION:
            raise Socks5Error(f"greeting: bad version {buf[off]:#04x}")
        if avail < 2:
            return False
        nmethods = buf[off + 1]
        if nmethods == 0:
            raise Socks5Error(
                "greeting: no methods offered", METHOD_NO_ACCEPTABLE, _NO_ACCEPTABLE
            )
        if avail < 2 + nmethods:
            return False
        methods = buf[off + 2 : off + 2 + nmethods]
        self._off = off + 2 + nmethods
        wanted = METHOD_USERPASS if self._auth_required else METHOD_NO_AUTH
        if wanted not in methods:
            raise Socks5Error(
                "greeting: no acceptable method", METHOD_NO_ACCEPTABLE, _NO_ACCEPTABLE
            )
        events.append(SendBytes(bytes([SOCKS_VERSION, wanted])))
        self._state = _State.AUTH if self._auth_required else _State.REQUEST
        return True

    def _parse_auth(self, events: list[Socks5Event]) -> bool:
        buf, off, avail = self._buf, self._off, self._avail()
        if avail < 1:
            return False
        if buf[off] != AUTH_VERSION:
            raise Socks5Error(f"auth: bad sub-negotiation version {buf[off]:#04x}")
        if avail < 2:
            return False
        ulen = buf[off + 1]
        if avail < 3 + ulen:
            return False
        plen = buf[off + 2 + ulen]
        end = off + 3 + ulen + plen
        if len(buf) < end:
            return False
        username = bytes(buf[off + 2 : off + 2 + ulen])
        password = bytes(buf[off + 3 + ulen : end])
        self._off = end
        assert self._check is not None
        # RFC 1929: ULEN is 1..255; an empty username never authenticates.
        # PLEN 0 is passed to the checker (some clients send empty passwords).
        if ulen and self._check(username, password):
            self.username = username
            events.append(SendBytes(_AUTH_OK))
            self._state = _State.REQUEST
        else:
            events.append(SendBytes(_AUTH_FAIL))
            events.append(AuthFailed())
            self._state = _State.CLOSED
        return True

    def _parse_request(self, events: list[Socks5Event]) -> bool:
        buf, off, avail = self._buf, self._off, self._avail()
        if avail < 1:
            return False
        if buf[off] != SOCKS_VERSION:
            raise Socks5Error(f"request: bad version {buf[off]:#04x}")
        if avail < 2:
            return False
        cmd = buf[off + 1]
        if cmd not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
            raise _request_error(
                f"request: unknown command {cmd:#04x}", REP_COMMAND_NOT_SUPPORTED
            )
        if avail < 3:
            return False
        if buf[off + 2] != 0:
            raise _request_error("request: RSV is not zero", REP_GENERAL_FAILURE)
        if avail < 4:
            return False
        atyp = buf[off + 3]
        parsed = _parse_address(buf, off + 3, len(buf))
        if parsed is None:
            return False
        host, port, end = parsed
        self._off = end
        request = Request(cmd=cmd, host=host, port=port, atyp=atyp)
        self.request = request
        events.append(request)
        self._state = _State.AWAIT_REPLY
        return True

    # -- output --------------------------------------------------------------

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """Build the reply to the :class:`Request`; only valid while awaiting it.

        ``code == REP_SUCCEEDED`` moves to "established" (take the leftover and
        start relaying); any other code closes the machine (write the reply,
        then close).  ``bind_host`` must be an IPv4/IPv6 literal.
        """
        if self._state is not _State.AWAIT_REPLY:
            raise RuntimeError(f"reply() in state {self._state.value!r}")
        data = build_reply(code, bind_host, bind_port)
        if code == REP_SUCCEEDED:
            self._state = _State.ESTABLISHED
        else:
            self._close()
        return data

    def take_leftover(self) -> bytes:
        """Return and forget the bytes received after the request."""
        if self._state not in (_State.AWAIT_REPLY, _State.ESTABLISHED):
            return b""
        data = bytes(self._buf[self._off :])
        self._buf = bytearray()
        self._off = 0
        return data


def _request_error(message: str, code: int) -> Socks5Error:
    return Socks5Error(message, code, build_reply(code))


def _parse_address(
    buf: bytes | bytearray, pos: int, end: int
) -> tuple[str, int, int] | None:
    """Parse ``ATYP ADDR PORT`` at ``buf[pos:end]``.

    Return ``(host, port, position after port)``, or None if incomplete.
    Raise Socks5Error (REP_ADDRESS_TYPE_NOT_SUPPORTED / REP_GENERAL_FAILURE
    responses) for an unknown type or a bad domain.
    """
    avail = end - pos
    if avail < 1:
        return None
    atyp = buf[pos]
    if atyp == ATYP_IPV4:
        addr_end = pos + 1 + 4
        if end < addr_end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[pos + 1 : addr_end])))
    elif atyp == ATYP_IPV6:
        addr_end = pos + 1 + 16
        if end < addr_end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[pos + 1 : addr_end])))
    elif atyp == ATYP_DOMAIN:
        if avail < 2:
            return None
        length = buf[pos + 1]
        if length == 0:
            raise _request_error("empty domain name", REP_GENERAL_FAILURE)
        addr_end = pos + 2 + length
        if end < addr_end + 2:
            return None
        try:
            host = _decode_domain(bytes(buf[pos + 2 : addr_end]))
        except ValueError as e:
            raise _request_error(str(e), REP_GENERAL_FAILURE) from None
    else:
        raise _request_error(
            f"unknown address type {atyp:#04x}", REP_ADDRESS_TYPE_NOT_SUPPORTED
        )
    port = int.from_bytes(buf[addr_end : addr_end + 2], "big")
    return host, port, addr_end + 2


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Parse a client UDP datagram ``RSV(2) FRAG ATYP ADDR PORT DATA``.

    Raises ``Socks5Error(reply=None)`` when malformed (non-zero RSV, unknown
    address type, bad domain, truncated); the caller silently drops it.
    Fragments (``frag != 0``) are returned; the caller must drop them too.
    """
    if len(data) < 4:
        raise Socks5Error("udp: datagram too short")
    if data[0] or data[1]:
        raise Socks5Error("udp: RSV is not zero")
    frag = data[2]
    try:
        parsed = _parse_address(data, 3, len(data))
    except Socks5Error as e:
        raise Socks5Error(f"udp: {e.message}") from None
    if parsed is None:
        raise Socks5Error("udp: truncated address")
    host, port, end = parsed
    return UdpDatagram(
        frag=frag, host=host, port=port, payload=data[end:], atyp=data[3]
    )


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """Build an unfragmented UDP datagram header plus ``payload``.

    ``host`` is an IP literal (the usual case: the remote's source address)
    or a domain name.  Raises ValueError on a bad host or port.
    """
    _check_port(port)
    return (
        b"\x00\x00\x00"
        + _encode_address(host, True)
        + port.to_bytes(2, "big")
        + payload
    )
