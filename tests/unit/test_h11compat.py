"""h11-mypyc (compiled h11) behaves exactly like h11: same events, same errors, same bytes out."""

from __future__ import annotations

from typing import Any

import h11 as ref
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wmproxy_tw.h11compat import h11 as used

fast = pytest.importorskip("h11_mypyc")

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b""]
TARGETS = [b"http://h/p?q", b"/", b"*", b"h:443", b"/a b", b"/\x7f", b"http://[::1]:8/x"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1"]
STATUS = [b"200 OK", b"204 No Content", b"304 Not Modified", b"101 Switching", b"100 Continue", b"404 ",
          b"999 X", b"2000 X", b"abc"]
FIELDS = [b"Host: h", b"Host: h2", b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 5, 5",
          b"Content-Length: 5, 6", b"Content-Length: -1", b"Content-Length: 99999999999999999999",
          b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: gzip, chunked",
          b"Connection: close", b"Connection: keep-alive, Upgrade", b"Upgrade: websocket", b"Expect: 100-continue",
          b"X: a\tb", b"X:  padded  ", b"X : space-before-colon", b" folded", b"\tfolded", b"X: \x00",
          b"X: \x80\xff", b"Bad Name: v", b"X:", b"no-colon"]
BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5;ext=1\r\nhello\r\n0\r\nT: v\r\n\r\n", b"zz\r\n",
          b"3\r\nab", b"0\r\n\r\n"]


def _head(first: bytes, fields: list[bytes], eol: bytes) -> bytes:
    return eol.join([first, *fields]) + eol + eol


messages = st.builds(
    lambda first, fields, eol, body, tail: _head(first, fields, eol) + body + tail,
    st.one_of(
        st.builds(lambda m, t, v: b" ".join([m, t, v]), st.sampled_from(METHODS), st.sampled_from(TARGETS),
                  st.sampled_from(VERSIONS)),
        st.builds(lambda v, s: v + b" " + s, st.sampled_from(VERSIONS), st.sampled_from(STATUS)),
    ),
    st.lists(st.sampled_from(FIELDS), max_size=6),
    st.sampled_from([b"\r\n", b"\n"]),
    st.sampled_from(BODIES),
    st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]),
)


def _norm(mod: Any, ev: Any) -> Any:
    """A library-independent picture of an event."""
    if ev is mod.NEED_DATA or ev is mod.PAUSED:
        return "NEED_DATA" if ev is mod.NEED_DATA else "PAUSED"
    out: dict[str, Any] = {"type": type(ev).__name__}
    for attr in ("method", "target", "http_version", "status_code", "reason", "chunk_start", "chunk_end"):
        if hasattr(ev, attr):
            out[attr] = getattr(ev, attr)
    if hasattr(ev, "data"):
        out["data"] = bytes(ev.data)
    if hasattr(ev, "headers"):
        out["headers"] = list(ev.headers.raw_items())
    return out


def _drive(mod: Any, role: str, data: bytes, cuts: list[int], eof: bool) -> list[Any]:
    """Feed ``data`` (split at ``cuts``) to a ``role`` connection; answer each request; record everything."""
    conn = mod.Connection(getattr(mod, role))
    trace: list[Any] = []
    if role == "CLIENT":
        trace.append(conn.send(mod.Request(method="GET", target="/", headers=[("Host", "h")])))
        trace.append(conn.send(mod.EndOfMessage()))
    pieces, pos = [], 0
    for n in cuts:
        pieces.append(data[pos:pos + n])
        pos += n
    pieces.append(data[pos:])
    if eof:
        pieces.append(b"")
    for piece in pieces:
        try:
            conn.receive_data(piece)
        except RuntimeError as e:  # receive after close
            trace.append(("receive-refused", str(e)))
            break
        for _ in range(50):
            try:
                ev = conn.next_event()
            except mod.RemoteProtocolError as e:
                trace.append(("error", e.error_status_hint))
                return trace
            trace.append(_norm(mod, ev))
            if ev is mod.NEED_DATA or ev is mod.PAUSED or type(ev).__name__ == "ConnectionClosed":
                break
            if role == "SERVER" and type(ev).__name__ == "EndOfMessage":
                try:
                    trace.append(conn.send(mod.Response(status_code=200, headers=[("Content-Length", "2")])))
                    trace.append(conn.send(mod.Data(data=b"ok")))
                    trace.append(conn.send(mod.EndOfMessage()))
                    conn.start_next_cycle()
                except mod.LocalProtocolError as e:
                    trace.append(("local-error", str(e)))
                    return trace
        trace.append((conn.our_state.__name__, conn.their_state.__name__))
    return trace


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=messages, cuts=st.lists(st.integers(0, 40), max_size=6), eof=st.booleans(),
       role=st.sampled_from(["SERVER", "CLIENT"]))
def test_same_events_and_errors(data: bytes, cuts: list[int], eof: bool, role: str) -> None:
    """Parsing any request or response stream, split anyhow, gives the same trace with h11 and h11-mypyc."""
    assert _drive(fast, role, data, cuts, eof) == _drive(ref, role, data, cuts, eof)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=300), role=st.sampled_from(["SERVER", "CLIENT"]))
def test_same_on_random_bytes(data: bytes, role: str) -> None:
    """Random bytes get the same events or the same error status from both."""
    assert _drive(fast, role, data, [], True) == _drive(ref, role, data, [], True)


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
@pytest.mark.parametrize("framing", [[("Content-Length", "3")], [("Transfer-Encoding", "chunked")], []])
def test_same_bytes_out(version: bytes, framing: list[tuple[str, str]]) -> None:
    """Serialising a response (framing rewritten for HTTP/1.0 peers, Connection: close added) is byte-identical."""
    outs = []
    for mod in (fast, ref):
        conn = mod.Connection(mod.SERVER)
        conn.receive_data(b"GET / HTTP/" + version + b"\r\nHost: h\r\n\r\n")
        conn.next_event()
        conn.next_event()
        out = conn.send(mod.Response(status_code=200, headers=[("X", "y"), *framing]))
        out += conn.send(mod.Data(data=b"abc")) + conn.send(mod.EndOfMessage())
        outs.append(out)
    assert outs[0] == outs[1]


def test_the_proxy_uses_the_compiled_one_when_installed() -> None:
    """With h11-mypyc installed, h11compat gives the compiled one."""
    assert used is fast
