"""Unit tests for the sans-IO SOCKS5 server state machine and UDP helpers."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmproxy_tw.forward.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    MAX_HANDSHAKE,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_HOST_UNREACHABLE,
    REP_SUCCEEDED,
    AuthFailed,
    Request,
    SendBytes,
    Socks5Error,
    Socks5Event,
    Socks5Server,
    UdpDatagram,
    build_reply,
    build_udp_datagram,
    parse_udp_datagram,
)

NO_AUTH_GREETING = b"\x05\x01\x00"
USERPASS_GREETING = b"\x05\x01\x02"


def creds(user: bytes, password: bytes) -> bytes:
    """Encode an RFC 1929 username/password message."""
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def req_v4(cmd: int, host: str, port: int) -> bytes:
    """Encode a request with an IPv4 address."""
    return (
        bytes([5, cmd, 0, ATYP_IPV4])
        + ipaddress.IPv4Address(host).packed
        + struct.pack("!H", port)
    )


def req_v6(cmd: int, host: str, port: int) -> bytes:
    """Encode a request with an IPv6 address."""
    return (
        bytes([5, cmd, 0, ATYP_IPV6])
        + ipaddress.IPv6Address(host).packed
        + struct.pack("!H", port)
    )


def req_domain(cmd: int, name: bytes, port: int) -> bytes:
    """Encode a request with a domain name."""
    return bytes([5, cmd, 0, ATYP_DOMAIN, len(name)]) + name + struct.pack("!H", port)


def check_alice(user: bytes, password: bytes) -> bool:
    """Accept only alice/secret."""
    return (user, password) == (b"alice", b"secret")


def whole(data: bytes) -> list[bytes]:
    """Deliver everything in one chunk."""
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    """Deliver one byte per chunk."""
    return [data[i : i + 1] for i in range(len(data))]


def pairs(data: bytes) -> list[bytes]:
    """Deliver two bytes per chunk."""
    return [data[i : i + 2] for i in range(0, len(data), 2)]


@pytest.fixture(params=[whole, bytewise, pairs], ids=["whole", "bytewise", "pairs"])
def split(request: pytest.FixtureRequest) -> Callable[[bytes], list[bytes]]:
    """Each test runs with the stream delivered whole, byte by byte and in pairs."""
    chunker: Callable[[bytes], list[bytes]] = request.param
    return chunker


class Outcome:
    """Everything a caller observes from feeding a stream."""

    def __init__(self) -> None:
        self.sent = b""
        self.events: list[Socks5Event] = []
        self.error: Socks5Error | None = None


def run(server: Socks5Server, chunks: Iterable[bytes]) -> Outcome:
    """Feed chunks until an error; collect the bytes to send and other events."""
    out = Outcome()
    for chunk in chunks:
        try:
            events = server.feed(chunk)
        except Socks5Error as e:
            out.sent += e.response
            out.error = e
            return out
        for ev in events:
            if isinstance(ev, SendBytes):
                out.sent += ev.data
            else:
                out.events.append(ev)
    return out


# -- successful handshakes -------------------------------------------------------


def test_no_auth_connect_ipv4(split: Callable[[bytes], list[bytes]]) -> None:
    """No-auth greeting plus IPv4 CONNECT yields 05 00 and a Request."""
    server = Socks5Server(auth_required=False, check_credentials=None)
    out = run(server, split(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.7", 443)))
    assert out.error is None
    assert out.sent == b"\x05\x00"
    assert out.events == [
        Request(cmd=CMD_CONNECT, host="192.0.2.7", port=443, atyp=ATYP_IPV4)
    ]
    assert server.state == "awaiting reply"
    assert server.request == out.events[0]


def test_whole_feed_returns_events_in_order() -> None:
    """One feed with greeting and request returns [SendBytes, Request] in order."""
    server = Socks5Server(auth_required=False)
    events = server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "10.0.0.1", 80))
    assert events == [
        SendBytes(b"\x05\x00"),
        Request(CMD_CONNECT, "10.0.0.1", 80, ATYP_IPV4),
    ]


def test_connect_domain(split: Callable[[bytes], list[bytes]]) -> None:
    """A domain-name CONNECT reports the name as text and ATYP 3."""
    server = Socks5Server(auth_required=False)
    out = run(
        server, split(NO_AUTH_GREETING + req_domain(CMD_CONNECT, b"example.com", 80))
    )
    assert out.events == [Request(CMD_CONNECT, "example.com", 80, ATYP_DOMAIN)]


def test_connect_ipv6_compressed_text(split: Callable[[bytes], list[bytes]]) -> None:
    """An IPv6 CONNECT reports the address in compressed textual form."""
    server = Socks5Server(auth_required=False)
    out = run(
        server, split(NO_AUTH_GREETING + req_v6(CMD_CONNECT, "2001:db8::1", 8443))
    )
    assert out.events == [Request(CMD_CONNECT, "2001:db8::1", 8443, ATYP_IPV6)]


def test_udp_associate_zero_address(split: Callable[[bytes], list[bytes]]) -> None:
    """UDP ASSOCIATE with 0.0.0.0:0 is reported as a Request."""
    server = Socks5Server(auth_required=False)
    out = run(server, split(NO_AUTH_GREETING + req_v4(CMD_UDP_ASSOCIATE, "0.0.0.0", 0)))
    assert out.events == [Request(CMD_UDP_ASSOCIATE, "0.0.0.0", 0, ATYP_IPV4)]


def test_bind_is_reported_and_answered_not_supported(
    split: Callable[[bytes], list[bytes]],
) -> None:
    """BIND arrives as a Request; reply(0x07) builds the refusal and closes."""
    server = Socks5Server(auth_required=False)
    out = run(server, split(NO_AUTH_GREETING + req_v4(CMD_BIND, "198.51.100.1", 2000)))
    assert out.events == [Request(CMD_BIND, "198.51.100.1", 2000, ATYP_IPV4)]
    assert (
        server.reply(REP_COMMAND_NOT_SUPPORTED)
        == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    )
    assert server.state == "closed"


def test_utf8_domain_converted_to_a_label(
    split: Callable[[bytes], list[bytes]],
) -> None:
    """A UTF-8 domain name is reported in IDNA A-label form."""
    server = Socks5Server(auth_required=False)
    out = run(
        server,
        split(NO_AUTH_GREETING + req_domain(CMD_CONNECT, "bücher.de".encode(), 80)),
    )
    assert out.events == [Request(CMD_CONNECT, "xn--bcher-kva.de", 80, ATYP_DOMAIN)]


def test_auth_success(split: Callable[[bytes], list[bytes]]) -> None:
    """Good credentials get 05 02 then 01 00 and the request goes through."""
    server = Socks5Server(auth_required=True, check_credentials=check_alice)
    stream = (
        USERPASS_GREETING
        + creds(b"alice", b"secret")
        + req_v4(CMD_CONNECT, "192.0.2.1", 22)
    )
    out = run(server, split(stream))
    assert out.error is None
    assert out.sent == b"\x05\x02\x01\x00"
    assert out.events == [Request(CMD_CONNECT, "192.0.2.1", 22, ATYP_IPV4)]
    assert server.username == b"alice"


def test_auth_failure_then_closed(split: Callable[[bytes], list[bytes]]) -> None:
    """Bad credentials get 01 01 and AuthFailed; later input is ignored."""
    server = Socks5Server(auth_required=True, check_credentials=check_alice)
    stream = (
        USERPASS_GREETING
        + creds(b"alice", b"wrong")
        + req_v4(CMD_CONNECT, "192.0.2.1", 22)
    )
    out = run(server, split(stream))
    assert out.error is None
    assert out.sent == b"\x05\x02\x01\x01"
    assert out.events == [AuthFailed()]
    assert server.state == "closed"
    assert server.username is None
    assert server.feed(b"more") == []


def test_auth_empty_username_fails_without_calling_checker() -> None:
    """ULEN 0 violates RFC 1929 and fails without consulting the checker."""
    calls: list[tuple[bytes, bytes]] = []

    def check(user: bytes, password: bytes) -> bool:
        """Record the call and accept."""
        calls.append((user, password))
        return True

    server = Socks5Server(auth_required=True, check_credentials=check)
    out = run(server, [USERPASS_GREETING + creds(b"", b"pw")])
    assert out.events == [AuthFailed()]
    assert calls == []


def test_auth_empty_password_passed_to_checker() -> None:
    """PLEN 0 is handed to the checker, which decides."""
    calls: list[tuple[bytes, bytes]] = []

    def check(user: bytes, password: bytes) -> bool:
        """Record the call and accept."""
        calls.append((user, password))
        return True

    server = Socks5Server(auth_required=True, check_credentials=check)
    out = run(server, [USERPASS_GREETING + creds(b"bob", b"")])
    assert out.sent == b"\x05\x02\x01\x00"
    assert calls == [(b"bob", b"")]


def test_auth_required_picks_userpass_among_offers() -> None:
    """With auth required, 0x02 is chosen even when 0x00 is also offered."""
    server = Socks5Server(auth_required=True, check_credentials=check_alice)
    assert server.feed(b"\x05\x02\x00\x02") == [SendBytes(b"\x05\x02")]
    assert server.state == "auth"


def test_no_auth_picks_noauth_among_offers() -> None:
    """Without auth, 0x00 is chosen when offered alongside 0x02."""
    server = Socks5Server(auth_required=False)
    assert server.feed(b"\x05\x02\x02\x00") == [SendBytes(b"\x05\x00")]
    assert server.state == "request"


def test_max_size_handshake_accepted() -> None:
    """A maximal handshake (255 methods, 255-byte creds and domain) is accepted."""
    user, password, name = b"u" * 255, b"p" * 255, b"d" * 255
    greeting = b"\x05\xff" + bytes(range(1, 256))
    stream = greeting + creds(user, password) + req_domain(CMD_CONNECT, name, 1)
    assert len(stream) == MAX_HANDSHAKE
    server = Socks5Server(
        auth_required=True, check_credentials=lambda u, p: (u, p) == (user, password)
    )
    out = run(server, bytewise(stream))
    assert out.events == [Request(CMD_CONNECT, name.decode(), 1, ATYP_DOMAIN)]


def test_empty_feed_returns_no_events() -> None:
    """Feeding b'' yields no events and keeps the state."""
    server = Socks5Server(auth_required=False)
    assert server.feed(b"") == []
    assert server.state == "greeting"


def test_constructor_requires_checker_when_auth_required() -> None:
    """auth_required without check_credentials is a programming error."""
    with pytest.raises(ValueError):
        Socks5Server(auth_required=True, check_credentials=None)


# -- leftover and reply ----------------------------------------------------------


def test_pipelined_data_is_leftover(split: Callable[[bytes], list[bytes]]) -> None:
    """Bytes after the request (e.g. a ClientHello) are kept for take_leftover."""
    server = Socks5Server(auth_required=False)
    hello = b"\x16\x03\x01\x00\x05hello"
    out = run(
        server,
        split(NO_AUTH_GREETING + req_domain(CMD_CONNECT, b"a.example", 443) + hello),
    )
    assert out.events == [Request(CMD_CONNECT, "a.example", 443, ATYP_DOMAIN)]
    assert server.feed(b" more") == []
    assert server.take_leftover() == hello + b" more"
    assert server.take_leftover() == b""


def test_reply_success_ipv4_then_established() -> None:
    """reply(0, v4) builds an IPv4 reply and moves to established."""
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80) + b"GET")
    assert (
        server.reply(REP_SUCCEEDED, "10.1.2.3", 5555)
        == b"\x05\x00\x00\x01\x0a\x01\x02\x03\x15\xb3"
    )
    assert server.state == "established"
    assert server.take_leftover() == b"GET"
    with pytest.raises(RuntimeError):
        server.feed(b"x")
    with pytest.raises(RuntimeError):
        server.reply(REP_SUCCEEDED, "10.1.2.3", 5555)


def test_reply_ipv6_encoding() -> None:
    """reply() with an IPv6 bind host uses ATYP 4 and 16 address bytes."""
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80))
    data = server.reply(REP_SUCCEEDED, "::1", 1080)
    assert data == b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x04\x38"


def test_reply_failure_closes() -> None:
    """A non-zero reply code closes the machine."""
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80))
    assert server.reply(REP_HOST_UNREACHABLE)[:2] == b"\x05\x04"
    assert server.state == "closed"
    assert server.feed(b"x") == []


def test_reply_before_request_is_an_error() -> None:
    """reply() outside "awaiting reply" raises RuntimeError."""
    server = Socks5Server(auth_required=False)
    with pytest.raises(RuntimeError):
        server.reply(REP_SUCCEEDED)
    assert server.take_leftover() == b""


@pytest.mark.parametrize(
    ("code", "host", "port"),
    [
        (0, "example.com", 80),
        (0, "1.2.3.4", 70000),
        (0, "1.2.3.4", -1),
        (256, "1.2.3.4", 80),
        (-1, "::", 0),
    ],
)
def test_build_reply_rejects_bad_arguments(code: int, host: str, port: int) -> None:
    """build_reply refuses domains, out-of-range ports and codes."""
    with pytest.raises(ValueError):
        build_reply(code, host, port)


def test_reply_bad_bind_host_keeps_state() -> None:
    """A bad bind host raises ValueError without leaving "awaiting reply"."""
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80))
    with pytest.raises(ValueError):
        server.reply(REP_SUCCEEDED, "not-an-ip", 1)
    assert server.state == "awaiting reply"


def test_pending_cap_while_awaiting_reply() -> None:
    """More than max_pending bytes while awaiting the reply is an error."""
    server = Socks5Server(auth_required=False, max_pending=10)
    server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80) + b"0123456789")
    with pytest.raises(Socks5Error) as info:
        server.feed(b"x")
    assert info.value.reply is None
    assert server.state == "closed"


def test_pending_cap_on_first_chunk() -> None:
    """Pipelined data beyond max_pending in the request's own chunk is an error."""
    server = Socks5Server(auth_required=False, max_pending=4)
    with pytest.raises(Socks5Error) as info:
        server.feed(NO_AUTH_GREETING + req_v4(CMD_CONNECT, "192.0.2.1", 80) + b"01234")
    assert info.value.response == b"\x05\x00"


# -- errors ---------------------------------------------------------------------


def err_reply(code: int) -> bytes:
    """The reply sent for a request-stage error."""
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    ("auth", "stream", "reply", "sent"),
    [
        pytest.param(False, b"\x04\x01\x00\x50", None, b"", id="socks4-greeting"),
        pytest.param(False, b"\x05\x00", 0xFF, b"\x05\xff", id="zero-methods"),
        pytest.param(
            False, b"\x05\x01\x02", 0xFF, b"\x05\xff", id="noauth-only-userpass"
        ),
        pytest.param(True, b"\x05\x01\x00", 0xFF, b"\x05\xff", id="auth-only-noauth"),
        pytest.param(False, b"\x05\x02\x01\x03", 0xFF, b"\x05\xff", id="gssapi-chap"),
        pytest.param(
            True, b"\x05\x01\x02\x05\x05alice", None, b"\x05\x02", id="auth-bad-version"
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x04\x01\x00\x01",
            None,
            b"\x05\x00",
            id="request-bad-version",
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x05\x09\x00\x01",
            0x07,
            b"\x05\x00" + err_reply(7),
            id="unknown-cmd",
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x05\x00\x00\x01",
            0x07,
            b"\x05\x00" + err_reply(7),
            id="cmd-zero",
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x05\x01\x00\x02",
            0x08,
            b"\x05\x00" + err_reply(8),
            id="unknown-atyp",
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x05\x01\x01\x01",
            0x01,
            b"\x05\x00" + err_reply(1),
            id="rsv-nonzero",
        ),
        pytest.param(
            False,
            b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50",
            0x01,
            b"\x05\x00" + err_reply(1),
            id="empty-domain",
        ),
        pytest.param(
            False,
            NO_AUTH_GREETING + req_domain(1, b"a\x00b", 80),
            0x01,
            b"\x05\x00" + err_reply(1),
            id="nul-domain",
        ),
        pytest.param(
            False,
            NO_AUTH_GREETING + req_domain(1, b"a b", 80),
            0x01,
            b"\x05\x00" + err_reply(1),
            id="space-domain",
        ),
        pytest.param(
            False,
            NO_AUTH_GREETING + req_domain(1, b"\xff\xfe", 80),
            0x01,
            b"\x05\x00" + err_reply(1),
            id="bad-utf8",
        ),
        pytest.param(
            False,
            NO_AUTH_GREETING + req_domain(1, "a\u200b\u00a0b".encode(), 80),
            0x01,
            b"\x05\x00" + err_reply(1),
            id="unicode-space-domain",
        ),
        pytest.param(
            False,
            NO_AUTH_GREETING + req_domain(1, "ä..b".encode(), 80),
            0x01,
            b"\x05\x00" + err_reply(1),
            id="bad-idna",
        ),
    ],
)
def test_malformed_handshakes(
    split: Callable[[bytes], list[bytes]],
    auth: bool,
    stream: bytes,
    reply: int | None,
    sent: bytes,
) -> None:
    """Each malformed handshake raises Socks5Error with the right reply bytes."""
    server = Socks5Server(
        auth_required=auth, check_credentials=check_alice if auth else None
    )
    out = run(server, split(stream))
    assert out.error is not None
    assert out.error.reply == reply
    assert out.sent == sent
    assert server.state == "closed"
    assert server.feed(b"\x05\x01\x00") == []


def test_error_detected_on_first_byte() -> None:
    """A wrong version byte fails immediately, without waiting for more."""
    server = Socks5Server(auth_required=False)
    with pytest.raises(Socks5Error) as info:
        server.feed(b"\x04")
    assert info.value.reply is None
    assert info.value.response == b""


def test_unknown_cmd_detected_before_address() -> None:
    """An unknown command fails as soon as its byte arrives."""
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH_GREETING)
    with pytest.raises(Socks5Error) as info:
        server.feed(b"\x05\x04")
    assert info.value.reply == REP_COMMAND_NOT_SUPPORTED
    assert info.value.response == err_reply(REP_COMMAND_NOT_SUPPORTED)


def test_error_response_includes_same_call_replies() -> None:
    """An error raised mid-feed carries the method selection produced earlier in that call."""
    server = Socks5Server(auth_required=False)
    with pytest.raises(Socks5Error) as info:
        server.feed(NO_AUTH_GREETING + b"\x05\x01\x00\x07")
    assert info.value.reply == REP_ADDRESS_TYPE_NOT_SUPPORTED
    assert info.value.response == b"\x05\x00" + err_reply(
        REP_ADDRESS_TYPE_NOT_SUPPORTED
    )
    assert "address type" in str(info.value)


# -- UDP datagrams ----------------------------------------------------------------


def test_parse_udp_ipv4() -> None:
    """An IPv4 datagram header is parsed and the payload kept intact."""
    data = b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35" + b"dns-query"
    assert parse_udp_datagram(data) == UdpDatagram(
        0, "192.0.2.1", 53, b"dns-query", ATYP_IPV4
    )


def test_parse_udp_ipv6_and_domain() -> None:
    """IPv6 and domain datagram headers are parsed."""
    v6 = (
        b"\x00\x00\x00\x04"
        + ipaddress.IPv6Address("2001:db8::2").packed
        + b"\x01\xbb"
        + b"x"
    )
    assert parse_udp_datagram(v6) == UdpDatagram(0, "2001:db8::2", 443, b"x", ATYP_IPV6)
    dom = b"\x00\x00\x00\x03\x0bexample.com\x00\x35"
    assert parse_udp_datagram(dom) == UdpDatagram(
        0, "example.com", 53, b"", ATYP_DOMAIN
    )


def test_parse_udp_fragment_is_reported() -> None:
    """A fragment (FRAG != 0) is parsed with its frag number for the caller to drop."""
    data = b"\x00\x00\x02\x01\x7f\x00\x00\x01\x00\x07data"
    assert parse_udp_datagram(data).frag == 2


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00", id="three-bytes"),
        pytest.param(b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x07", id="rsv-nonzero"),
        pytest.param(b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x07", id="bad-atyp"),
        pytest.param(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00", id="truncated-port"),
        pytest.param(b"\x00\x00\x00\x04\x00\x00", id="truncated-v6"),
        pytest.param(b"\x00\x00\x00\x03", id="missing-domain-length"),
        pytest.param(b"\x00\x00\x00\x03\x05ab", id="truncated-domain"),
        pytest.param(b"\x00\x00\x00\x03\x00\x00\x35", id="empty-domain"),
        pytest.param(b"\x00\x00\x00\x03\x02\x01\x02\x00\x35", id="ctl-domain"),
    ],
)
def test_parse_udp_malformed(data: bytes) -> None:
    """Malformed datagrams raise Socks5Error with reply None."""
    with pytest.raises(Socks5Error) as info:
        parse_udp_datagram(data)
    assert info.value.reply is None


def test_build_udp_datagram_encodings() -> None:
    """build_udp_datagram picks ATYP from the host and prefixes RSV/FRAG zeros."""
    assert (
        build_udp_datagram("192.0.2.1", 53, b"q")
        == b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35q"
    )
    assert (
        build_udp_datagram("::1", 1, b"")
        == b"\x00\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"
    )
    assert (
        build_udp_datagram("example.com", 53, b"")
        == b"\x00\x00\x00\x03\x0bexample.com\x00\x35"
    )


@pytest.mark.parametrize(
    ("host", "port"), [("1.2.3.4", 65536), ("1.2.3.4", -1), ("", 53), ("a" * 256, 53)]
)
def test_build_udp_datagram_rejects_bad_arguments(host: str, port: int) -> None:
    """build_udp_datagram refuses bad ports and empty or oversize names."""
    with pytest.raises(ValueError):
        build_udp_datagram(host, port, b"")


# -- properties -------------------------------------------------------------------


def chunks_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split data at the given (unsorted, possibly repeated) cut points."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


ips_v4 = st.ip_addresses(v=4).map(str)
ips_v6 = st.ip_addresses(v=6).map(str)
domains = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,20}\.){0,3}[a-z]{2,6}", fullmatch=True)


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bool, bytes, Request, bytes]:
    """A valid handshake (with or without auth), its request and pipelined bytes."""
    auth = draw(st.booleans())
    wanted = 2 if auth else 0
    others = draw(
        st.lists(st.integers(0, 255).filter(lambda m: m != wanted), max_size=5)
    )
    methods = bytes(draw(st.permutations([wanted, *others])))
    stream = bytes([5, len(methods)]) + methods
    if auth:
        stream += creds(b"alice", b"secret")
    cmd = draw(st.sampled_from([CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE]))
    port = draw(st.integers(0, 65535))
    kind = draw(st.sampled_from([ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN]))
    if kind == ATYP_IPV4:
        host = draw(ips_v4)
        stream += req_v4(cmd, host, port)
    elif kind == ATYP_IPV6:
        host = draw(ips_v6)
        stream += req_v6(cmd, host, port)
    else:
        host = draw(domains)
        stream += req_domain(cmd, host.encode(), port)
    tail = draw(st.binary(max_size=40))
    return auth, stream + tail, Request(cmd, host, port, kind), tail


@settings(max_examples=200, deadline=None)
@given(valid_streams(), st.lists(st.integers(0, 2000), max_size=20))
def test_any_split_gives_same_result(
    case: tuple[bool, bytes, Request, bytes], cuts: list[int]
) -> None:
    """Arbitrary splits of a valid stream give the same replies, request and leftover."""
    auth, stream, request, tail = case
    server = Socks5Server(auth_required=auth, check_credentials=check_alice)
    out = run(server, chunks_at(stream, cuts))
    assert out.error is None
    assert out.sent == (b"\x05\x02\x01\x00" if auth else b"\x05\x00")
    assert out.events == [request]
    assert server.take_leftover() == tail


@settings(max_examples=200, deadline=None)
@given(
    st.booleans(), st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=10)
)
def test_garbage_only_raises_socks5error(
    auth: bool, garbage: bytes, cuts: list[int]
) -> None:
    """Random input, arbitrarily split, only ever raises Socks5Error."""
    server = Socks5Server(auth_required=auth, check_credentials=check_alice)
    run(server, chunks_at(garbage, cuts))


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.binary(max_size=300))
def test_garbage_after_valid_greeting_only_raises_socks5error(
    auth: bool, garbage: bytes
) -> None:
    """Random bytes after a valid greeting (and auth) only raise Socks5Error."""
    server = Socks5Server(auth_required=auth, check_credentials=check_alice)
    prefix = (
        USERPASS_GREETING + creds(b"alice", b"secret") if auth else NO_AUTH_GREETING
    )
    run(server, bytewise(prefix + garbage))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_udp_garbage_only_raises_socks5error(data: bytes) -> None:
    """parse_udp_datagram on random bytes returns or raises Socks5Error only."""
    try:
        parse_udp_datagram(data)
    except Socks5Error:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(ips_v4, ips_v6, domains), st.integers(0, 65535), st.binary(max_size=64)
)
def test_udp_build_parse_roundtrip(host: str, port: int, payload: bytes) -> None:
    """build_udp_datagram then parse_udp_datagram returns the same host, port and payload."""
    parsed = parse_udp_datagram(build_udp_datagram(host, port, payload))
    assert (parsed.frag, parsed.host, parsed.port, parsed.payload) == (
        0,
        host,
        port,
        payload,
    )
