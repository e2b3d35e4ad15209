"""Tests for the tunnel frame codec (``wmproxy_tw.tunnel.frames``)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wmproxy_tw.tunnel.frames import (
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    Accept,
    AuthFailed,
    Close,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    HelloOk,
    Open,
    Ping,
    Pong,
    Refuse,
    Register,
    Reset,
    ResetCode,
    TunnelProtocolError,
    WindowUpdate,
    encode,
    encode_all,
    encode_data,
    error_frame,
)

pytestmark = pytest.mark.timeout(30)

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SAMPLES: list[Frame] = [
    Hello(client="office-pc", token="s3cr3t"),
    Hello(client="", window=1, username="wmproxy", password="p@ss word"),
    Hello(),
    HelloOk(window=65536, heartbeat_ms=10_000),
    AuthFailed("invalid token"),
    Register("web", "http", ("localhost", "*.example.com")),
    Register("ssh", "tcp", (), remote_port=2222),
    Register("px", "proxy"),
    Register("web2", "http", ("a.example",), headers=("proxy + X-From {client_ip}", "- etag")),
    Accept("web"),
    Refuse("ssh", "remote_port 2222 is taken by client 'office-pc'"),
    Open(2, "web", "203.0.113.7:51234"),
    Open(1, "@proxy", None),
    Data(2, b"GET / HTTP/1.1\r\n\r\n"),
    Data(4, b"\x00" * MAX_DATA_PAYLOAD),
    WindowUpdate(2, 131072),
    Close(2),
    Reset(3, ResetCode.CONNECT_FAILED),
    Ping(b"\x00\x01\x02\x03\x04\x05\x06\x07"),
    Pong(b"\xff" * 8),
    GoAway(ErrorCode.NO_ERROR, "shutting down"),
    Error(ErrorCode.UNKNOWN_FRAME, "unknown frame type 0x7f"),
]


def header(frame_type: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    """A raw frame header."""
    return struct.pack("!BBII", frame_type, flags, stream_id, length)


def decode_all(data: bytes, max_payload: int = MAX_DATA_PAYLOAD) -> list[Frame]:
    """Decode a complete byte string in one feed."""
    return FrameDecoder(max_payload).feed(data)


def protocol_error(data: bytes, max_payload: int = MAX_DATA_PAYLOAD) -> TunnelProtocolError:
    """Feed ``data`` and return the protocol error it must raise."""
    with pytest.raises(TunnelProtocolError) as info:
        decode_all(data, max_payload)
    return info.value


# --- hypothesis strategies ------------------------------------------------------------------------

printable = st.text(st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "),
                    max_size=60)
names = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
domains = st.from_regex(r"(\*\.)?[A-Za-z0-9_\-]{1,12}(\.[A-Za-z0-9_\-]{1,12}){0,3}",
                        fullmatch=True)
peers = st.none() | st.from_regex(r"[A-Za-z0-9_.:%\[\]\-]{1,64}", fullmatch=True)
stream_ids = st.integers(1, 2**32 - 1)
secrets = st.text(min_size=1, max_size=40)
u32 = st.integers(0, 2**32 - 1)
eight = st.binary(min_size=8, max_size=8)

hellos = st.one_of(
    st.builds(Hello, client=printable, window=st.integers(1, 2**31 - 1)),
    st.builds(Hello, client=printable, token=secrets),
    st.builds(Hello, client=printable, username=secrets, password=secrets),
)
frames: st.SearchStrategy[Frame] = st.one_of(
    hellos,
    st.builds(HelloOk, window=st.integers(1, 2**31 - 1), heartbeat_ms=st.integers(1, 3_600_000)),
    st.builds(AuthFailed, printable),
    st.builds(Register, names, st.sampled_from(["http", "https", "tcp", "proxy"]),
              st.lists(domains, max_size=4).map(tuple), st.none() | st.integers(1, 65535),
              st.lists(printable.filter(bool), max_size=3).map(tuple)),
    st.builds(Accept, names),
    st.builds(Refuse, names, printable),
    st.builds(Open, stream_ids, names | names.map(lambda n: "@" + n), peers),
    st.builds(Data, stream_ids, st.binary(min_size=1, max_size=300)),
    st.builds(WindowUpdate, stream_ids, st.integers(1, 2**31 - 1)),
    st.builds(Close, stream_ids),
    st.builds(Reset, stream_ids, u32),
    st.builds(Ping, eight),
    st.builds(Pong, eight),
    st.builds(GoAway, u32, printable),
    st.builds(Error, u32, printable),
)


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip_each_frame_type(frame: Frame) -> None:
    """Every frame type decodes back to an equal frame."""
    data = encode(frame)
    assert data[0] == frame.frame_type
    assert decode_all(data) == [frame]


def test_every_frame_type_is_sampled() -> None:
    """The round-trip samples cover every defined frame type."""
    assert {f.frame_type for f in SAMPLES} == set(FrameType)


def test_one_byte_at_a_time() -> None:
    """Feeding the stream one byte at a time yields the same frames."""
    data = encode_all(SAMPLES)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    assert out == SAMPLES
    assert decoder.buffered == 0


@FAST
@given(st.lists(frames, max_size=8), st.data())
def test_arbitrary_splits_round_trip(sample: list[Frame], data: st.DataObject) -> None:
    """encode -> split anywhere -> decode gives back the same frames."""
    wire = encode_all(sample)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
    assert out == sample
    assert decoder.buffered == 0


# --- the data path: encode_data, feed_data --------------------------------------------------------


def merged(items: list[Frame | tuple[int, bytes]]) -> list[Frame | tuple[int, bytes]]:
    """DATA as ``(stream_id, bytes)``, consecutive pieces of one stream joined."""
    out: list[Frame | tuple[int, bytes]] = []
    for item in items:
        if isinstance(item, Data):
            item = (item.stream_id, item.data)
        if isinstance(item, tuple) and out and isinstance(out[-1], tuple) \
                and out[-1][0] == item[0]:
            out[-1] = (item[0], out[-1][1] + item[1])
        else:
            out.append(item)
    return out


@FAST
@given(stream_ids, st.binary(min_size=1, max_size=5000), st.integers(1, 2000))
def test_encode_data_is_data_frames(stream_id: int, data: bytes, max_frame: int) -> None:
    """encode_data gives the bytes of DATA frames of at most max_frame, in order."""
    frames = [Data(stream_id, data[i:i + max_frame]) for i in range(0, len(data), max_frame)]
    assert encode_data(stream_id, data, max_frame) == encode_all(frames)
    assert encode_data(stream_id, memoryview(data), max_frame) == encode_all(frames)


@FAST
@given(st.lists(frames | st.builds(Data, st.sampled_from([1, 2]),
                                   st.binary(min_size=1, max_size=3000)), max_size=10), st.data())
def test_feed_data_arbitrary_splits(sample: list[Frame], data: st.DataObject) -> None:
    """feed_data over any split gives every frame, DATA as pieces that join to the payloads."""
    wire = encode_all(sample)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    out: list[Frame | tuple[int, bytes]] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed_data(wire[start:cut])
        start = cut
    assert all(len(item[1]) > 0 for item in out if isinstance(item, tuple))
    assert merged(out) == merged(list(sample))
    assert decoder.buffered == 0


def test_feed_data_one_byte_at_a_time() -> None:
    """One byte per read still gives every frame and every DATA byte, in order."""
    wire = encode_all(SAMPLES)
    decoder = FrameDecoder()
    out: list[Frame | tuple[int, bytes]] = []
    for i in range(len(wire)):
        out += decoder.feed_data(wire[i:i + 1])
    assert merged(out) == merged(list(SAMPLES))


def test_feed_data_joins_a_run_and_passes_payload_reads_uncopied() -> None:
    """Consecutive DATA of a stream come out as one piece; a read of pure payload is itself."""
    decoder = FrameDecoder()
    run = encode_all([Data(1, b"a" * 100), Data(1, b"b" * 100), Data(3, b"c"), Close(3)])
    assert decoder.feed_data(run) == [(1, b"a" * 100 + b"b" * 100), (3, b"c"), Close(3)]
    big = encode(Data(5, b"x" * 60000))
    assert decoder.feed_data(big[:1000]) == [(5, b"x" * (1000 - HEADER_SIZE))]
    assert decoder.buffered == 0  # DATA payloads are handed out, never buffered
    middle = big[1000:50000]
    [(stream_id, piece)] = decoder.feed_data(middle)
    assert stream_id == 5 and piece is middle
    assert decoder.feed_data(big[50000:] + encode(Close(5))) == [(5, big[50000:]), Close(5)]


def test_feed_data_checks_like_feed() -> None:
    """Oversized DATA, unknown types and DATA on stream 0 fail feed_data as they fail feed."""
    for wire in (header(FrameType.DATA, 1, MAX_DATA_PAYLOAD + 1), header(0x7F, 0, 0),
                 header(FrameType.DATA, 0, 1) + b"x", header(FrameType.DATA, 1, 0)):
        decoder = FrameDecoder()
        with pytest.raises(TunnelProtocolError):
            decoder.feed_data(wire)
        with pytest.raises(TunnelProtocolError):
            decoder.feed_data(encode(Close(1)))  # stays failed


def test_feed_after_feed_data_mid_frame_is_misuse() -> None:
    """The two feeding methods do not mix while a DATA frame is half read."""
    decoder = FrameDecoder()
    decoder.feed_data(encode(Data(1, b"xyz"))[:-1])
    with pytest.raises(RuntimeError):
        decoder.feed(b"z")


# --- garbage --------------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200), st.integers(1, 64))
def test_garbage_only_raises_protocol_error(garbage: bytes, chunk: int) -> None:
    """Random bytes either decode or raise TunnelProtocolError, never anything else."""
    decoder = FrameDecoder()
    try:
        for i in range(0, len(garbage), chunk):
            decoder.feed(garbage[i:i + chunk])
    except TunnelProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    assert decoder.buffered <= HEADER_SIZE + MAX_CONTROL_PAYLOAD + MAX_DATA_PAYLOAD


@FAST
@given(st.binary(max_size=400), st.integers(1, 64))
def test_garbage_feed_data_only_raises_protocol_error(garbage: bytes, chunk: int) -> None:
    """feed_data on random bytes yields items or raises TunnelProtocolError, nothing else."""
    decoder = FrameDecoder()
    try:
        for i in range(0, len(garbage), chunk):
            for item in decoder.feed_data(garbage[i:i + chunk]):
                assert isinstance(item, tuple) or hasattr(item, "frame_type")
    except TunnelProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    assert decoder.buffered <= HEADER_SIZE + MAX_CONTROL_PAYLOAD


@FAST
@given(frames, st.data())
def test_mutated_frames_only_raise_protocol_error(frame: Frame, data: st.DataObject) -> None:
    """A valid frame with some bytes overwritten never escapes as another exception."""
    wire = bytearray(encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_all(bytes(wire))
    except TunnelProtocolError:
        pass


@FAST
@given(st.sampled_from([FrameType.HELLO, FrameType.HELLO_OK, FrameType.REGISTER,
                        FrameType.ACCEPT, FrameType.REFUSE]),
       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12))
def test_json_garbage_only_raises_protocol_error(frame_type: FrameType, value: object) -> None:
    """Arbitrary JSON in a control frame is decoded strictly or refused as a protocol error."""
    body = json.dumps(value).encode()
    if frame_type == FrameType.HELLO:
        body = MAGIC + b"\x00\x01" + body
    try:
        decode_all(header(frame_type, 0, len(body)) + body)
    except TunnelProtocolError as exc:
        assert exc.code == ErrorCode.PROTOCOL_ERROR


# --- limits and rejections ------------------------------------------------------------------------


def test_oversized_data_rejected_from_header_alone() -> None:
    """A DATA header announcing more than 64 KiB fails before any payload is buffered."""
    exc = protocol_error(header(FrameType.DATA, 1, MAX_DATA_PAYLOAD + 1))
    assert exc.code == ErrorCode.FRAME_TOO_LARGE


def test_configured_max_payload_applies_to_data() -> None:
    """A decoder built with a lower max_payload refuses larger DATA frames."""
    assert decode_all(encode(Data(1, b"x" * 1024)), max_payload=1024)
    exc = protocol_error(encode(Data(1, b"x" * 1025)), max_payload=1024)
    assert exc.code == ErrorCode.FRAME_TOO_LARGE


def test_oversized_control_frame_rejected() -> None:
    """A control frame above 16 KiB is refused as too large."""
    exc = protocol_error(header(FrameType.REGISTER, 0, MAX_CONTROL_PAYLOAD + 1))
    assert exc.code == ErrorCode.FRAME_TOO_LARGE


def test_fixed_size_frames_must_have_their_size() -> None:
    """PING with 7 bytes or WINDOW_UPDATE with 5 bytes is refused."""
    assert protocol_error(header(FrameType.PING, 0, 7) + b"x" * 7).code == ErrorCode.PROTOCOL_ERROR
    exc = protocol_error(header(FrameType.WINDOW_UPDATE, 1, 5) + b"x" * 5)
    assert exc.code == ErrorCode.FRAME_TOO_LARGE


def test_unknown_frame_type_rejected() -> None:
    """An unknown type byte is an UNKNOWN_FRAME protocol error, detected from the header."""
    exc = protocol_error(header(0x7F, 0, 0))
    assert exc.code == ErrorCode.UNKNOWN_FRAME
    assert "0x7f" in exc.message


def test_nonzero_flags_rejected() -> None:
    """Version 1 defines no flags, so any set flag is a protocol error."""
    assert protocol_error(header(FrameType.CLOSE, 1, 0, flags=1)).code == ErrorCode.PROTOCOL_ERROR


def test_stream_zero_rules() -> None:
    """Stream frames need a non-zero id and connection frames need id 0."""
    assert protocol_error(header(FrameType.DATA, 0, 1) + b"x").code == ErrorCode.PROTOCOL_ERROR
    exc = protocol_error(header(FrameType.PING, 5, 8) + b"x" * 8)
    assert exc.code == ErrorCode.PROTOCOL_ERROR


def test_empty_data_rejected() -> None:
    """A zero-length DATA frame is a protocol error."""
    assert protocol_error(header(FrameType.DATA, 1, 0)).code == ErrorCode.PROTOCOL_ERROR


def test_zero_window_increment_rejected() -> None:
    """WINDOW_UPDATE with increment 0 is a protocol error."""
    exc = protocol_error(header(FrameType.WINDOW_UPDATE, 1, 4) + b"\0\0\0\0")
    assert exc.code == ErrorCode.PROTOCOL_ERROR


def test_hello_bad_magic_rejected() -> None:
    """A HELLO without the WMTUNNEL magic is a protocol error."""
    wire = bytearray(encode(Hello()))
    wire[HEADER_SIZE] ^= 0xFF
    assert protocol_error(bytes(wire)).code == ErrorCode.PROTOCOL_ERROR


def test_hello_unsupported_version() -> None:
    """A HELLO of an unknown version gives UNSUPPORTED_VERSION naming the supported ones."""
    body = MAGIC + b"\x00\x02" + b"{}"
    exc = protocol_error(header(FrameType.HELLO, 0, len(body)) + body)
    assert exc.code == ErrorCode.UNSUPPORTED_VERSION
    assert "supported versions: 1" in exc.message


@pytest.mark.parametrize("body", [
    b'{"name":"a","name":"b"}',
    b'{"name":"a","extra":1}',
    b'{}',
    b'["a"]',
    b'{"name":1}',
    b'{"name":"bad name"}',
    '{"name":"a"}'.encode("utf-16"),
    b"\xef\xbb\xbf" + b'{"name":"a"}',
    b"[" * 10000,
    b'{"name":"a"',
], ids=["duplicate", "extra", "missing", "array", "int", "pattern", "utf16", "bom", "deep",
        "truncated"])
def test_strict_json_schema(body: bytes) -> None:
    """ACCEPT payloads that are not exactly {"name": <valid name>} are protocol errors."""
    exc = protocol_error(header(FrameType.ACCEPT, 0, len(body)) + body)
    assert exc.code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("body", [
    b'{"window":true,"heartbeat_ms":1,"version":1}',
    b'{"window":1,"heartbeat_ms":1,"version":true}',
    b'{"window":1.0,"heartbeat_ms":1,"version":1}',
    b'{"window":NaN,"heartbeat_ms":1,"version":1}',
    b'{"window":0,"heartbeat_ms":1,"version":1}',
], ids=["bool-window", "bool-version", "float", "nan", "zero"])
def test_hello_ok_numbers_are_exact_integers(body: bytes) -> None:
    """Booleans, floats, NaN and out-of-range values are not accepted as integers."""
    exc = protocol_error(header(FrameType.HELLO_OK, 0, len(body)) + body)
    assert exc.code == ErrorCode.PROTOCOL_ERROR


def test_hello_auth_shapes() -> None:
    """HELLO auth must be {}, {token} or {username, password} with string values."""
    auth: object
    for auth in ({"token": "t", "username": "u"}, {"username": "u"}, {"token": None},
                 {"token": 5}, [], {"password": "p"}):
        body = MAGIC + b"\x00\x01" + json.dumps(
            {"client": "", "window": 1, "auth": auth}).encode()
        exc = protocol_error(header(FrameType.HELLO, 0, len(body)) + body)
        assert exc.code == ErrorCode.PROTOCOL_ERROR, auth


def test_text_must_be_utf8() -> None:
    """An ERROR message that is not UTF-8 is a protocol error."""
    body = b"\0\0\0\1\xff\xfe"
    assert protocol_error(header(FrameType.ERROR, 0, len(body)) + body).code == 1


def test_control_characters_refused_in_text() -> None:
    """A REFUSE reason with a line break (log forging) is a protocol error."""
    body = b'{"name":"a","reason":"x\\nFAKE LOG LINE"}'
    assert protocol_error(header(FrameType.REFUSE, 0, len(body)) + body).code == 1


def test_decoder_stays_failed() -> None:
    """After a protocol error the decoder refuses further input with the same error."""
    decoder = FrameDecoder()
    with pytest.raises(TunnelProtocolError) as first:
        decoder.feed(header(0x7F, 0, 0))
    with pytest.raises(TunnelProtocolError) as second:
        decoder.feed(encode(Close(1)))
    assert second.value is first.value
    assert decoder.buffered == 0


def test_buffer_holds_at_most_one_partial_frame() -> None:
    """Complete frames are removed from the buffer; only the partial tail stays."""
    decoder = FrameDecoder()
    wire = encode_all([Data(1, b"a" * 1000)] * 50) + encode(Data(1, b"b" * 1000))[:500]
    assert len(decoder.feed(wire)) == 50
    assert decoder.buffered == 500 - HEADER_SIZE


def test_many_frames_in_one_chunk() -> None:
    """Twenty thousand small frames in one chunk decode in order (no quadratic slicing)."""
    sample = [WindowUpdate(2 * i + 1, i + 1) for i in range(20_000)]
    assert FrameDecoder().feed(encode_all(sample)) == sample


# --- construction and helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: Data(1, b""),
    lambda: Data(0, b"x"),
    lambda: Data(1, b"x" * (MAX_DATA_PAYLOAD + 1)),
    lambda: Ping(b"short"),
    lambda: WindowUpdate(1, 2**31),
    lambda: Hello(token="t", username="u", password="p"),
    lambda: Hello(username="u"),
    lambda: Hello(version=2),
    lambda: Register("web", "ftp"),
    lambda: Register("web", "http", ("bad domain",)),
    lambda: Register("web", "tcp", remote_port=0),
    lambda: Register("web", "http", ("a.example",), headers=("",)),
    lambda: Register("web", "http", ("a.example",), headers=("+ X-Bad \n line",)),
    lambda: Register("web", "http", ("a.example",), headers=tuple("- etag" for _ in range(65))),
    lambda: Register("web", "http", tuple(f"d{i}.example" for i in range(33))),
    lambda: Open(2, "web", "1.2.3.4:5 injected"),
    lambda: AuthFailed("é" * 600),
    lambda: Reset(1, True),
])
def test_invalid_frames_cannot_be_built(build: object) -> None:
    """Frames validate on construction, so invalid ones never reach the wire."""
    with pytest.raises((ValueError, TypeError)):
        build()  # type: ignore[operator]


def test_register_accepts_list_of_domains() -> None:
    """A list of domains is stored as a tuple so the frame stays hashable."""
    frame = Register("web", "http", ["a.example"])  # type: ignore[arg-type]
    assert frame.domains == ("a.example",)
    assert hash(frame)


def test_hello_repr_hides_secrets() -> None:
    """Logging a HELLO never shows the token or password."""
    assert "s3cr3t" not in repr(Hello(token="s3cr3t"))
    assert "hunter2" not in repr(Hello(username="u", password="hunter2"))


def test_data_repr_is_short() -> None:
    """A DATA frame's repr shows its length, not its bytes."""
    assert repr(Data(3, b"x" * 60000)) == "Data(stream_id=3, len=60000)"


def test_error_frame_sanitizes_message() -> None:
    """error_frame replaces control characters and truncates to 1024 bytes."""
    frame = error_frame(TunnelProtocolError(ErrorCode.PROTOCOL_ERROR, "a\nb" + "é" * 2000))
    assert frame.code == ErrorCode.PROTOCOL_ERROR
    assert frame.message.startswith("a?b")
    assert len(frame.message.encode()) <= 1024
    assert decode_all(encode(frame)) == [frame]
