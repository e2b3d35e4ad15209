"""The reverse proxy's HTTP/1.1 channel on a StringTransport and a Clock: parsing,
request-smuggling defence, limits, deadlines, pipelining and body streaming."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wmproxy_tw.reverse.channel import HTTP11Channel, Limits
from wmproxy_tw.reverse.handlers import respond_text
from wmproxy_tw.reverse.request import ReverseRequest


class Collect:
    """A body reader that keeps what it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = False
        self.failed: Optional[tuple[int, str]] = None

    def body_data(self, data: bytes) -> None:
        self.data += data

    def body_end(self) -> None:
        self.ended = True

    def body_failed(self, status: int, message: str) -> None:
        self.failed = (status, message)


class FakeSite:
    """Dispatches to ``on_request`` (default: answer 200 'ok' at once)."""

    requestFactory = ReverseRequest

    def __init__(self, clock: Clock, on_request: Optional[Callable[[Any], None]] = None) -> None:
        self.clock = clock
        self.requests: list[Any] = []
        self.on_request = on_request or (lambda r: respond_text(r, 200, b"ok " + r.uri))

    def dispatch(self, request: Any) -> None:
        self.requests.append(request)
        self.on_request(request)

    def log(self, request: Any) -> None:
        request.log_once()


def make(on_request: Optional[Callable[[Any], None]] = None, **limits: Any) -> tuple[HTTP11Channel, StringTransport, FakeSite, Clock]:
    clock = Clock()
    site = FakeSite(clock, on_request)
    ch = HTTP11Channel(site, Limits(**limits))
    t = StringTransport()
    ch.makeConnection(t)
    return ch, t, site, clock


def statuses(t: StringTransport) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", t.value())]


def test_keepalive_requests_are_answered_in_order() -> None:
    """Two requests on one connection, the second pipelined in the same read, are both answered."""
    ch, t, site, _ = make()
    ch.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(t) == [200, 200]
    assert b"ok /a" in t.value() and b"ok /b?q=1" in t.value()
    assert [r.norm_path for r in site.requests] == ["/a", "/b"] and site.requests[1].query == "q=1"
    assert not t.disconnecting


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://user@x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: \x00\r\n\r\n",
    b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_smuggling_battery_is_400_and_never_dispatched(raw: bytes) -> None:
    """Ambiguous framing, bare LF/CR, missing or repeated Host and bad targets: 400, close, nothing routed."""
    ch, t, site, _ = make()
    ch.dataReceived(raw)
    assert statuses(t) == [400], t.value()
    assert site.requests == [] and t.disconnecting


def test_oversized_chunk_size_is_400_after_dispatch_without_body_bytes() -> None:
    """A 2**64-sized chunk is refused at its size line: the reader gets no data, the client a 400."""
    reader = Collect()
    ch, t, site, _ = make(lambda r: r.stream_body(reader))
    ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 + b"\r\n")
    assert statuses(t) == [400] and reader.data == b"" and reader.failed is not None and t.disconnecting


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(20)) + b"\r\n", 431),
    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n", 414),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 417),
])
def test_limits(raw: bytes, status: int) -> None:
    """Header size and count → 431, long request line → 414, body over client_max_body_size → 413."""
    ch, t, site, _ = make(max_header_size=1024, max_headers=10, max_body_size=1024)
    ch.dataReceived(raw)
    assert statuses(t) == [status] and site.requests == [] and t.disconnecting


def test_chunked_body_over_the_limit_is_413() -> None:
    """A chunked body is counted as it arrives; past client_max_body_size the reader fails and the client gets 413."""
    reader = Collect()
    ch, t, site, _ = make(lambda r: r.stream_body(reader), max_body_size=10)
    ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    ch.dataReceived(b"8\r\n")
    assert reader.data == b"12345678" and reader.failed is not None and reader.failed[0] == 413
    assert statuses(t) == [413] and t.disconnecting


def test_slow_loris_gets_408_at_the_deadline() -> None:
    """A head trickling one byte a second is cut off at client_header_timeout, not reset by each byte."""
    ch, t, site, clock = make(header_timeout=10.0)
    for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30:
        clock.advance(1)
        if t.disconnecting:
            break
        ch.dataReceived(bytes([b]))
    assert statuses(t) == [408] and 9 <= clock.seconds() <= 11 and site.requests == []


def test_idle_keepalive_connection_is_closed_quietly() -> None:
    """After a response, an idle connection is closed after client_keepalive_timeout without a 408."""
    ch, t, site, clock = make(keepalive_timeout=5.0, header_timeout=10.0)
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(4.9)
    assert not t.disconnecting
    clock.advance(0.2)
    assert t.disconnecting and statuses(t) == [200]


def test_connection_close_and_http10_are_not_kept_alive() -> None:
    """Connection: close (and HTTP/1.0) responses say so and close after the response."""
    for raw in (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
        ch, t, site, _ = make()
        ch.dataReceived(raw)
        assert t.disconnecting and site.requests
    ch, t, _s, _ = make()
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Connection: close\r\n" in t.value()


def test_body_is_streamed_with_back_pressure_and_100_continue() -> None:
    """The body reaches the reader as it arrives; 100 Continue goes out only when the body is wanted;
    pause_body pauses the client transport and resume_body resumes it."""
    reader = Collect()
    held: list[Any] = []
    ch, t, site, _ = make(lambda r: held.append(r))
    ch.dataReceived(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    req = held[0]
    assert t.value() == b"" and t.producerState == "paused"  # nothing read until someone wants the body
    req.stream_body(reader)
    assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n" and t.producerState == "producing"
    ch.dataReceived(b"hello")
    req.pause_body()
    assert t.producerState == "paused" and reader.data == b"hello"
    req.resume_body()
    ch.dataReceived(b"world")
    assert reader.data == b"helloworld" and reader.ended and req.body_complete
    respond_text(req, 201, b"")
    assert statuses(t) == [100, 201] and not t.disconnecting


def test_early_refusal_skips_100_continue_and_closes() -> None:
    """A request answered before its body is read never gets 100 Continue, and the connection closes."""
    ch, t, site, _ = make(lambda r: respond_text(r, 403, b"no"))
    ch.dataReceived(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    assert statuses(t) == [403] and t.disconnecting


def test_non_streaming_handler_sees_the_request_after_the_body() -> None:
    """discard_body drains the body (it is not kept) before the handler runs; keep-alive continues."""
    order: list[str] = []

    def on_request(r: Any) -> None:
        order.append("dispatched")
        r.discard_body(lambda: (order.append("drained"), respond_text(r, 200, b"done")))

    ch, t, site, _ = make(on_request)
    ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert order == ["dispatched"]
    ch.dataReceived(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert order == ["dispatched", "drained", "dispatched", "drained"] and statuses(t) == [200, 200]


def test_pipelined_requests_wait_for_the_response_before() -> None:
    """A request pipelined behind a slow one is read only after the first response ends."""
    held: list[Any] = []
    ch, t, site, _ = make(lambda r: held.append(r))
    ch.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(held) == 1
    respond_text(held[0], 200, b"one")
    assert len(held) == 2
    respond_text(held[1], 200, b"two")
    assert statuses(t) == [200, 200]


def test_response_started_then_body_error_aborts() -> None:
    """Once the response has begun, a protocol error aborts the connection (no error page inside a body)."""
    reader = Collect()

    def on_request(r: Any) -> None:
        r.stream_body(reader)
        r.setResponseCode(200)
        r.write(b"partial")

    ch, t, site, _ = make(on_request)
    ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert statuses(t) == [200] and reader.failed is not None and t.disconnecting


def test_absolute_form_and_host_variants() -> None:
    """absolute-form targets route by their authority; Host ports and case are ignored for routing."""
    ch, t, site, _ = make()
    ch.dataReceived(b"GET http://Example.TEST:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n"
                    b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
    a, b = site.requests
    assert (a.host_name, a.norm_path, a.query) == ("example.test", "/p", "q")
    assert b.host_name == "::1" and statuses(t) == [200, 200]


def test_client_gone_mid_request_notifies_the_request() -> None:
    """When the client disconnects, the request's notifyFinish errbacks and its reader fails."""
    reader = Collect()
    held: list[Any] = []
    ch, t, site, _ = make(lambda r: (held.append(r), r.stream_body(reader)))
    ch.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    failures: list[Any] = []
    held[0].notifyFinish().addErrback(failures.append)
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    ch.connectionLost(Failure(ConnectionLost()))
    assert reader.failed is not None and len(failures) == 1
