"""Tests for the sans-IO tunnel session (``wmproxy_tw.tunnel.session``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wmproxy_tw.tunnel.frames import (
    MAX_WINDOW,
    Accept,
    Close,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    GoAway,
    Hello,
    Open,
    Ping,
    Pong,
    Register,
    Reset,
    ResetCode,
    TunnelProtocolError,
    WindowUpdate,
    encode_all,
)
from wmproxy_tw.tunnel.session import (
    GROW_AFTER,
    AuthRejected,
    ErrorReceived,
    Event,
    GoAwayReceived,
    Heartbeat,
    HelloAccepted,
    HelloReceived,
    Multiplexer,
    PingReceived,
    PongReceived,
    RegisterReceived,
    RegistrationAccepted,
    RegistrationRefused,
    Reply,
    StreamClosed,
    StreamData,
    StreamOpened,
    StreamReset,
    TunnelStateError,
    WindowOpened,
)

pytestmark = pytest.mark.timeout(30)


class Link:
    """A server and a client multiplexer joined through the real codec."""

    def __init__(self, server: Multiplexer, client: Multiplexer) -> None:
        self.server = server
        self.client = client
        self._to_server = FrameDecoder()
        self._to_client = FrameDecoder()

    def to_server(self, frames: list[Frame]) -> list[Event]:
        """Encode frames from the client, decode and apply them at the server."""
        return [event for frame in self._to_server.feed(encode_all(frames))
                for event in self.server.receive_frame(frame)]

    def to_client(self, frames: list[Frame]) -> list[Event]:
        """Encode frames from the server, decode and apply them at the client."""
        return [event for frame in self._to_client.feed(encode_all(frames))
                for event in self.client.receive_frame(frame)]


def connected(window: int = 1000, max_streams: int = 16, max_data_frame: int = 400) -> Link:
    """A link whose handshake is done, both sides granting ``window`` per stream."""
    link = Link(Multiplexer(False, window, max_streams, max_data_frame),
                Multiplexer(True, window, max_streams, max_data_frame))
    assert isinstance(link.to_server(link.client.hello(client="pc", token="t"))[0], HelloReceived)
    assert link.to_client(link.server.accept_hello(heartbeat_ms=5000)) == [
        HelloAccepted(window, 5000)]
    return link


def protocol_error(mux: Multiplexer, frame: Frame) -> ErrorCode:
    """Apply ``frame`` and return the code of the protocol error it must raise."""
    with pytest.raises(TunnelProtocolError) as info:
        mux.receive_frame(frame)
    return info.value.code


def payload(events: list[Event], stream_id: int) -> bytes:
    """Concatenated StreamData bytes of one stream."""
    return b"".join(e.data for e in events if isinstance(e, StreamData)
                    and e.stream_id == stream_id)


# --- handshake and registration -------------------------------------------------------------------


def test_handshake_exchanges_windows() -> None:
    """HELLO / HELLO_OK open both sides and teach each the other's window."""
    link = Link(Multiplexer(False, initial_window=5000), Multiplexer(True, initial_window=7000))
    events = link.to_server(link.client.hello(username="u", password="p"))
    assert events == [HelloReceived(Hello(window=7000, username="u", password="p"))]
    assert not link.server.is_open
    assert link.to_client(link.server.accept_hello()) == [HelloAccepted(5000, 10_000)]
    assert link.server.is_open and link.client.is_open
    assert (link.server.peer_window, link.client.peer_window) == (7000, 5000)


def test_server_requires_hello_first() -> None:
    """Any first frame other than HELLO is a protocol error at the server."""
    assert protocol_error(Multiplexer(False), Open(1, "@proxy")) == ErrorCode.PROTOCOL_ERROR
    assert protocol_error(Multiplexer(False), Ping(b"12345678")) == ErrorCode.PROTOCOL_ERROR


def test_nothing_before_hello_is_answered() -> None:
    """A client may not pipeline REGISTER (or anything) before HELLO_OK."""
    server = Multiplexer(False)
    server.receive_frame(Hello(token="t"))
    assert protocol_error(server, Register("web", "http", ("a",))) == ErrorCode.PROTOCOL_ERROR


def test_client_accepts_only_hello_answers() -> None:
    """Before HELLO_OK the client refuses other frames, and any frame before its own HELLO."""
    assert protocol_error(Multiplexer(True), Ping(b"12345678")) == ErrorCode.PROTOCOL_ERROR
    client = Multiplexer(True)
    client.hello(token="t")
    assert protocol_error(client, Open(2, "web")) == ErrorCode.PROTOCOL_ERROR


def test_auth_rejected_closes_both_sides() -> None:
    """AUTH_FAILED reaches the client as AuthRejected and closes both sessions."""
    link = Link(Multiplexer(False), Multiplexer(True))
    link.to_server(link.client.hello(token="wrong"))
    assert link.to_client(link.server.reject_hello("invalid token")) == [
        AuthRejected("invalid token")]
    assert link.server.is_closed and link.client.is_closed
    assert link.server.receive_frame(Register("web", "tcp")) == []
    with pytest.raises(TunnelStateError):
        link.client.register("web", "tcp")


def test_hello_only_once() -> None:
    """A second HELLO, or HELLO_OK after the handshake, is a protocol error."""
    link = connected()
    assert protocol_error(link.server, Hello()) == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(TunnelStateError):
        link.client.hello()


def test_registration_accept_and_refuse() -> None:
    """Each REGISTER gets its own ACCEPT or REFUSE, matched by name."""
    link = connected()
    events = link.to_server(link.client.register("web", "http", ("localhost",))
                            + link.client.register("ssh", "tcp", remote_port=2222))
    assert events == [RegisterReceived(Register("web", "http", ("localhost",))),
                      RegisterReceived(Register("ssh", "tcp", (), 2222))]
    replies = (link.server.refuse_registration("ssh", "remote_port 2222 is taken")
               + link.server.accept_registration("web"))
    assert link.to_client(replies) == [RegistrationRefused("ssh", "remote_port 2222 is taken"),
                                       RegistrationAccepted("web")]


def test_duplicate_registration() -> None:
    """A name registered twice is local misuse at the client and a protocol error at the server."""
    link = connected()
    link.to_server(link.client.register("web", "http", ("a",)))
    with pytest.raises(TunnelStateError):
        link.client.register("web", "http", ("b",))
    assert protocol_error(link.server, Register("web", "http", ("b",))) == 1


def test_registration_replies_must_match_pending() -> None:
    """ACCEPT for a name not pending is a protocol error; so is a reply the server never owed."""
    link = connected()
    assert protocol_error(link.client, Accept("nope")) == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(TunnelStateError):
        link.server.accept_registration("nope")


def test_registration_frames_have_a_direction() -> None:
    """Only the client sends REGISTER and only the server sends ACCEPT/REFUSE."""
    link = connected()
    assert protocol_error(link.client, Register("web", "tcp")) == ErrorCode.PROTOCOL_ERROR
    assert protocol_error(link.server, Accept("web")) == ErrorCode.PROTOCOL_ERROR


# --- stream ids -----------------------------------------------------------------------------------


def test_stream_id_parity() -> None:
    """Client-initiated streams are odd and server-initiated even, both increasing."""
    link = connected()
    ids = [link.client.open_stream("@proxy")[0] for _ in range(3)]
    ids += [link.server.open_stream("web")[0] for _ in range(2)]
    assert ids == [1, 3, 5, 2, 4]


def test_open_announces_mapping_and_peer() -> None:
    """OPEN reaches the peer as StreamOpened with the mapping and public address."""
    link = connected()
    stream_id, frames = link.server.open_stream("web", "203.0.113.7:4000")
    assert link.to_client(frames) == [StreamOpened(stream_id, "web", "203.0.113.7:4000")]


def test_open_with_wrong_parity_is_stream_error() -> None:
    """A server receiving an even (server-side) OPEN id raises STREAM_ERROR."""
    link = connected()
    assert protocol_error(link.server, Open(2, "@proxy")) == ErrorCode.STREAM_ERROR
    assert protocol_error(link.client, Open(1, "web")) == ErrorCode.STREAM_ERROR


def test_open_ids_must_increase() -> None:
    """Reusing or going back to an older stream id is a STREAM_ERROR."""
    link = connected()
    link.server.receive_frame(Open(5, "@proxy"))
    assert protocol_error(link.server, Open(5, "@proxy")) == ErrorCode.STREAM_ERROR
    assert protocol_error(link.server, Open(3, "@proxy")) == ErrorCode.STREAM_ERROR


def test_frame_on_never_opened_stream_is_stream_error() -> None:
    """DATA, CLOSE or WINDOW_UPDATE for a stream id never opened is a STREAM_ERROR."""
    link = connected()
    assert protocol_error(link.client, Data(2, b"x")) == ErrorCode.STREAM_ERROR
    assert protocol_error(link.client, Close(1)) == ErrorCode.STREAM_ERROR
    assert protocol_error(link.client, WindowUpdate(4, 1)) == ErrorCode.STREAM_ERROR
    with pytest.raises(TunnelStateError):
        link.client.send_data(9, b"x")


def test_frames_after_reset_are_ignored() -> None:
    """Frames that crossed our RESET on the wire are dropped, not errors."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    link.server.reset_stream(stream_id)
    for frame in (Data(stream_id, b"late"), WindowUpdate(stream_id, 10), Close(stream_id),
                  Reset(stream_id, 0)):
        assert link.server.receive_frame(frame) == []
    assert link.server.send_data(stream_id, b"more") == ([], b"")
    assert link.server.consume(stream_id, 0) == []
    assert link.server.close_stream(stream_id) == []


def test_stream_limit_refuses_extra_streams() -> None:
    """An OPEN above max_streams gets RESET(REFUSED); a local open above it raises."""
    link = connected(max_streams=2)
    for _ in range(2):
        link.to_server(link.client.open_stream("@proxy")[1])
    assert link.server.receive_frame(Open(5, "@proxy")) == [Reply(Reset(5, ResetCode.REFUSED))]
    with pytest.raises(TunnelStateError):
        link.client.open_stream("@proxy")
    assert link.server.receive_frame(Data(5, b"x")) == []


def test_goaway_stops_new_streams_only() -> None:
    """After GOAWAY new OPENs are refused, opening raises, and open streams keep flowing."""
    link = connected()
    stream_id, frames = link.client.open_stream("@proxy")
    link.to_server(frames)
    assert link.to_client(link.server.go_away(ErrorCode.NO_ERROR, "bye")) == [
        GoAwayReceived(0, "bye")]
    with pytest.raises(TunnelStateError):
        link.client.open_stream("@proxy")
    with pytest.raises(TunnelStateError):
        link.server.open_stream("web")
    assert link.server.receive_frame(Open(3, "@proxy")) == [Reply(Reset(3, ResetCode.REFUSED))]
    frames, rest = link.client.send_data(stream_id, b"still here")
    assert payload(link.to_server(frames), stream_id) == b"still here" and rest == b""


# --- data, half-close, reset ----------------------------------------------------------------------


def test_send_data_respects_peer_window() -> None:
    """send_data frames at most the granted credit and returns the rest."""
    link = connected(window=1000, max_data_frame=400)
    stream_id, _ = link.server.open_stream("web")
    frames, rest = link.server.send_data(stream_id, bytes(range(250)) * 10)
    assert [len(f.data) for f in frames if isinstance(f, Data)] == [400, 400, 200]
    assert rest == (bytes(range(250)) * 10)[1000:]
    assert link.server.send_window(stream_id) == 0
    assert link.server.send_data(stream_id, rest) == ([], rest)


def test_window_update_arithmetic() -> None:
    """Credit returns once half the window is consumed, exactly the consumed amount."""
    link = connected(window=1000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    frames, _ = link.server.send_data(stream_id, b"x" * 1000)
    link.to_client(frames)
    assert link.client.consume(stream_id, 499) == []
    update = link.client.consume(stream_id, 1)
    assert update == [WindowUpdate(stream_id, 500)]
    assert link.to_server(update) == [WindowOpened(stream_id, 500)]
    assert link.server.send_window(stream_id) == 500
    assert link.client.consume(stream_id, 500) == [WindowUpdate(stream_id, 500)]


def test_data_beyond_window_is_flow_control_error() -> None:
    """A peer sending more than the credit it was granted gets FLOW_CONTROL_ERROR."""
    link = connected(window=1000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    link.client.receive_frame(Data(stream_id, b"x" * 600))
    assert protocol_error(link.client, Data(stream_id, b"x" * 401)) == ErrorCode.FLOW_CONTROL_ERROR


def test_window_overflow_is_flow_control_error() -> None:
    """A WINDOW_UPDATE taking the credit above 2**31-1 is a FLOW_CONTROL_ERROR."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    code = protocol_error(link.server, WindowUpdate(stream_id, MAX_WINDOW))
    assert code == ErrorCode.FLOW_CONTROL_ERROR


def test_consume_more_than_received_is_misuse() -> None:
    """Consuming bytes that were never delivered raises TunnelStateError."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    link.to_client(link.server.send_data(stream_id, b"abc")[0])
    with pytest.raises(TunnelStateError):
        link.client.consume(stream_id, 4)


def test_half_close() -> None:
    """CLOSE ends one direction only; the stream is gone once both sides closed."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert link.to_client(link.server.close_stream(stream_id)) == [StreamClosed(stream_id)]
    assert link.server.close_stream(stream_id) == []
    with pytest.raises(TunnelStateError):
        link.server.send_data(stream_id, b"x")
    assert protocol_error(link.client, Data(stream_id, b"x")) == ErrorCode.STREAM_ERROR
    frames, _ = link.client.send_data(stream_id, b"response")
    assert payload(link.to_server(frames), stream_id) == b"response"
    assert link.to_server(link.client.close_stream(stream_id)) == [StreamClosed(stream_id)]
    assert link.server.stream_count == 0 and link.client.stream_count == 0


def test_close_twice_is_stream_error() -> None:
    """A peer sending CLOSE twice on one stream commits a STREAM_ERROR."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames + link.server.close_stream(stream_id))
    assert protocol_error(link.client, Close(stream_id)) == ErrorCode.STREAM_ERROR


def test_no_window_update_after_peer_closed() -> None:
    """Consuming after the peer's CLOSE returns no credit (the peer sends no more)."""
    link = connected(window=1000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames + link.server.send_data(stream_id, b"x" * 1000)[0]
                   + link.server.close_stream(stream_id))
    assert link.client.consume(stream_id, 1000) == []


def test_reset_aborts_both_directions() -> None:
    """RESET reaches the peer with its code and forgets the stream at both ends."""
    link = connected()
    stream_id, frames = link.client.open_stream("@proxy")
    link.to_server(frames)
    events = link.to_client(link.server.reset_stream(stream_id, ResetCode.CONNECT_FAILED))
    assert events == [StreamReset(stream_id, ResetCode.CONNECT_FAILED)]
    assert link.client.stream_count == link.server.stream_count == 0
    assert not link.client.can_send(stream_id)


# --- flow control between streams -----------------------------------------------------------------


def test_stalled_reader_blocks_only_its_own_stream() -> None:
    """A stream whose reader never consumes stops at one window; its neighbour keeps flowing."""
    window = 64 * 1024
    link = connected(window=window, max_data_frame=16 * 1024)
    stalled, f1 = link.server.open_stream("web")
    flowing, f2 = link.server.open_stream("web")
    link.to_client(f1 + f2)
    total = 2 * 1024 * 1024
    source = bytes(i % 251 for i in range(total))
    pending = {stalled: source, flowing: source}
    received = {stalled: bytearray(), flowing: bytearray()}
    for _ in range(1000):
        if not pending[flowing]:
            break
        to_client: list[Frame] = []
        for stream_id in (stalled, flowing):
            frames, pending[stream_id] = link.server.send_data(stream_id, pending[stream_id])
            to_client += frames
        updates: list[Frame] = []
        for event in link.to_client(to_client):
            assert isinstance(event, StreamData)
            received[event.stream_id] += event.data
            if event.stream_id == flowing:
                updates += link.client.consume(flowing, len(event.data))
        for event in link.to_server(updates):
            assert isinstance(event, WindowOpened) and event.stream_id == flowing
    assert bytes(received[flowing]) == source
    assert bytes(received[stalled]) == source[:window]
    assert len(pending[stalled]) == total - window
    assert link.server.send_window(stalled) == 0


OPS = st.lists(st.tuples(st.sampled_from(["send", "consume"]), st.integers(0, 2),
                        st.integers(0, 3000)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_interleavings_never_exceed_credit(ops: list[tuple[str, int, int]]) -> None:
    """Any mix of sends and consumes on three streams stays within credit and loses no byte."""
    interleave(ops, None)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_interleavings_with_auto_tuning(ops: list[tuple[str, int, int]]) -> None:
    """With windows growing, credit still bounds what each stream and the link hold."""
    interleave(ops, 4000)


def interleave(ops: list[tuple[str, int, int]], max_window: int | None) -> None:
    """Apply the operations; check the credit bounds after each and the bytes at the end."""
    link = connected(window=1000, max_data_frame=300)
    if max_window is not None:  # auto-tuning: each stream may grow to 4000, 5000 in all
        link.client.max_window = max_window
        link.client.window_budget = link.client._budget_left = 5000
        link.client.grow_after = 1
    ids = [link.server.open_stream("web")[0] for _ in range(3)]
    link.to_client([Open(i, "web") for i in ids])
    sent = {i: bytearray() for i in ids}
    fed = {i: bytearray() for i in ids}
    queued = {i: b"" for i in ids}
    got = {i: bytearray() for i in ids}
    consumed = dict.fromkeys(ids, 0)
    counter = 0
    for op, index, amount in ops:
        stream_id = ids[index]
        if op == "send":
            fresh = bytes((counter + k) % 256 for k in range(amount))
            counter += amount
            fed[stream_id] += fresh
            frames, queued[stream_id] = link.server.send_data(stream_id,
                                                              queued[stream_id] + fresh)
            for frame in frames:
                assert isinstance(frame, Data)
                sent[stream_id] += frame.data
            for event in link.to_client(frames):
                assert isinstance(event, StreamData)
                got[event.stream_id] += event.data
        else:
            take = min(amount, len(got[stream_id]) - consumed[stream_id])
            consumed[stream_id] += take
            link.to_server(link.client.consume(stream_id, take))
        for i in ids:
            assert len(got[i]) - consumed[i] <= (max_window or 1000)
        assert sum(len(got[i]) - consumed[i] for i in ids) <= 3000 + (5000 if max_window else 0)
    assert got == sent
    assert all(bytes(sent[i]) + queued[i] == bytes(fed[i]) for i in ids)


# --- the data path: send_data_wire, receive_data -------------------------------------------------


def test_send_data_wire_matches_send_data() -> None:
    """send_data_wire gives the encoded frames of send_data and how much of the data they carry."""
    link = connected(window=1000, max_data_frame=400)
    twin = connected(window=1000, max_data_frame=400)
    a, _ = link.server.open_stream("web")
    b, _ = twin.server.open_stream("web")
    blob = bytes(range(250)) * 6
    wire, taken = link.server.send_data_wire(a, blob)
    frames, rest = twin.server.send_data(b, blob)
    assert wire == encode_all(frames) and taken == 1000 and rest == blob[taken:]
    assert link.server.send_data_wire(a, blob[taken:]) == (b"", 0)
    assert link.server.send_window(a) == twin.server.send_window(b) == 0


def test_send_data_wire_on_gone_or_closed_streams() -> None:
    """A reset stream swallows the data; one closed by this side is misuse."""
    link = connected()
    stream_id, _ = link.server.open_stream("web")
    link.server.reset_stream(stream_id)
    assert link.server.send_data_wire(stream_id, b"abc") == (b"", 3)
    other, _ = link.server.open_stream("web")
    link.server.close_stream(other)
    with pytest.raises(TunnelStateError):
        link.server.send_data_wire(other, b"abc")


def test_receive_data_uses_credit_like_data_frames() -> None:
    """receive_data counts any piece of DATA against the credit, byte for byte."""
    link = connected(window=1000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert link.client.receive_data(stream_id, b"x" * 600)
    assert link.client.receive_data(stream_id, b"x" * 400)
    with pytest.raises(TunnelProtocolError) as info:
        link.client.receive_data(stream_id, b"x")
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert link.client.consume(stream_id, 1000) == [WindowUpdate(stream_id, 1000)]


def test_receive_data_stream_rules() -> None:
    """Never-opened streams, DATA after CLOSE and DATA before the handshake are errors."""
    link = connected()
    with pytest.raises(TunnelProtocolError) as info:
        link.client.receive_data(2, b"x")
    assert info.value.code == ErrorCode.STREAM_ERROR
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames + link.server.close_stream(stream_id))
    with pytest.raises(TunnelProtocolError):
        link.client.receive_data(stream_id, b"x")
    link.client.reset_stream(stream_id)
    assert link.client.receive_data(stream_id, b"x") is False  # crossed our RESET
    with pytest.raises(TunnelProtocolError):
        Multiplexer(False).receive_data(1, b"x")


# --- window auto-tuning ---------------------------------------------------------------------------


def pump(link: Link, stream_id: int, amount: int, consume: bool = True) -> int:
    """Send ``amount`` bytes server -> client as credit allows, consuming at once; bytes moved."""
    moved = 0
    while moved < amount:
        wire, taken = link.server.send_data_wire(stream_id, b"d" * (amount - moved))
        if not taken:
            break
        moved += taken
        updates: list[Frame] = []
        for frame in FrameDecoder().feed(wire):
            assert link.client.receive_data(frame.stream_id, frame.data)
            if consume:
                updates += link.client.consume(frame.stream_id, len(frame.data))
        link.to_server(updates)
    return moved


def tuned(window: int = 1000, max_window: int = 8000, budget: int = 10_000) -> Link:
    """A connected link whose client grows windows (server -> client streams)."""
    link = connected(window=window)
    link.client.max_window = max_window
    link.client.window_budget = link.client._budget_left = budget
    return link


def test_auto_tuning_is_off_by_default() -> None:
    """Without max_window the window stays the initial one however much flows."""
    link = connected(window=1000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert pump(link, stream_id, 100_000) == 100_000
    assert link.server.send_window(stream_id) <= 1000


def test_window_grows_for_a_busy_stream_up_to_max_window() -> None:
    """A stream whose reader keeps consuming doubles its window, up to max_window."""
    link = tuned(window=1000, max_window=8000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert pump(link, stream_id, GROW_AFTER * 1000 - 1) == GROW_AFTER * 1000 - 1
    assert link.client._streams[stream_id].window == 1000  # not before GROW_AFTER windows
    pump(link, stream_id, 200_000)
    assert link.client._streams[stream_id].window == 8000
    assert link.server.send_window(stream_id) <= 8000


def test_window_growth_is_bounded_per_connection_and_returned() -> None:
    """Growth over all streams stays within window_budget; a stream's growth returns at its end."""
    link = tuned(window=1000, max_window=8000, budget=10_000)
    ids = []
    for _ in range(3):
        stream_id, frames = link.server.open_stream("web")
        link.to_client(frames)
        pump(link, stream_id, 200_000)
        ids.append(stream_id)
    windows = [link.client._streams[i].window for i in ids]
    assert sum(w - 1000 for w in windows) <= 10_000 and windows[0] == 8000
    link.to_server(link.client.reset_stream(ids[0]))
    fresh, frames = link.server.open_stream("web")
    link.to_client(frames)
    pump(link, fresh, 200_000)
    assert link.client._streams[fresh].window == 8000


def test_a_reader_that_stalls_early_keeps_the_initial_window() -> None:
    """A stream whose reader never consumes never grows: it holds one initial window."""
    link = tuned(window=1000, max_window=8000)
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert pump(link, stream_id, 50_000, consume=False) == 1000
    assert link.client._streams[stream_id].window == 1000


# --- heartbeats, errors ---------------------------------------------------------------------------


def test_ping_is_answered_with_pong() -> None:
    """PING yields PingReceived plus a Reply carrying the PONG with the same bytes."""
    link = connected()
    events = link.to_server(link.client.ping(b"abcdefgh"))
    assert events == [PingReceived(b"abcdefgh"), Reply(Pong(b"abcdefgh"))]
    assert link.to_client([Pong(b"abcdefgh")]) == [PongReceived(b"abcdefgh")]


def test_error_received_closes_session() -> None:
    """An ERROR from the peer closes the session; later frames are ignored, stream ops no-ops."""
    link = connected()
    stream_id, frames = link.server.open_stream("web")
    link.to_client(frames)
    assert link.to_client([Error(ErrorCode.INTERNAL_ERROR, "boom")]) == [ErrorReceived(7, "boom")]
    assert link.client.is_closed
    assert link.client.receive_frame(Data(stream_id, b"x")) == []
    assert link.client.send_data(stream_id, b"x") == ([], b"")
    assert link.client.close_stream(stream_id) == []
    with pytest.raises(TunnelStateError):
        link.client.open_stream("@proxy")


def test_fail_returns_error_frame() -> None:
    """fail() closes the session and returns the ERROR frame for the violation."""
    link = connected()
    exc = TunnelProtocolError(ErrorCode.STREAM_ERROR, "bad id")
    assert link.server.fail(exc) == [Error(ErrorCode.STREAM_ERROR, "bad id")]
    assert link.server.is_closed


def test_streams_need_a_finished_handshake() -> None:
    """Opening a stream or registering before HELLO_OK is local misuse."""
    client = Multiplexer(True)
    client.hello()
    with pytest.raises(TunnelStateError):
        client.open_stream("@proxy")
    with pytest.raises(TunnelStateError):
        client.register("web", "tcp")


def test_goaway_frame_round_trips_through_session() -> None:
    """go_away marks the local side and returns a GOAWAY frame."""
    link = connected()
    assert link.client.go_away() == [GoAway(ErrorCode.NO_ERROR, "")]
    assert link.client.local_going_away


def test_heartbeat_pings_when_idle_and_declares_death() -> None:
    """Pings fall due every interval of silence; the peer is dead at timeout."""
    beat = Heartbeat(interval=10, timeout=30, now=100)
    assert not beat.ping_due(109.9) and beat.ping_due(110)
    beat.make_ping(110)
    assert beat.next_ping_at() == 120 and not beat.ping_due(119)
    beat.make_ping(120)
    assert not beat.peer_dead(129.9) and beat.peer_dead(130)
    assert beat.next_wakeup() == 130


def test_heartbeat_traffic_postpones_everything() -> None:
    """Any received frame pushes both the next ping and the deadline."""
    beat = Heartbeat(interval=10, timeout=30, now=0)
    beat.received(25)
    assert beat.next_ping_at() == 35 and beat.deadline() == 55
    assert not beat.peer_dead(54) and beat.next_wakeup() == 35
    beat.received(20)  # out-of-order timestamps never move time back
    assert beat.deadline() == 55


def test_heartbeat_pong_round_trip() -> None:
    """A PONG echoing the latest PING gives the RTT; any other payload gives None."""
    beat = Heartbeat(interval=1, timeout=3, now=0)
    ping = beat.make_ping(5.0)
    assert beat.pong_received(b"zzzzzzzz", 5.1) is None
    assert beat.pong_received(ping.payload, 5.25) == pytest.approx(0.25)
    assert beat.pong_received(ping.payload, 5.3) is None
    assert beat.make_ping(6).payload != ping.payload


def test_heartbeat_rejects_bad_parameters() -> None:
    """The interval must be positive and shorter than the timeout."""
    with pytest.raises(ValueError):
        Heartbeat(interval=30, timeout=30, now=0)
    with pytest.raises(ValueError):
        Heartbeat(interval=0, timeout=30, now=0)
