"""The request pipeline of the reverse proxy (location → steps → handler) and its seams,
driven through the real channel on a StringTransport."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from wmproxy_tw.config import load_text
from wmproxy_tw.config.model import HttpServer, Location
from wmproxy_tw.reverse.channel import Limits
from wmproxy_tw.reverse.handlers import (
    AccessStep,
    IBodyReader,
    IHandler,
    IStep,
    LocationCtx,
    ProxyHandler,
    StaticResponseHandler,
    respond_text,
)
from wmproxy_tw.reverse.proxy import Exchange
from wmproxy_tw.reverse.route import VirtualHosts, compile_rule
from wmproxy_tw.feature import BuildContext
from wmproxy_tw.reverse.site import ReverseFeature, ReverseSite, ServerCtx


@implementer(IHandler)
class Recorder:
    """A handler double: answers 200 with what it saw."""

    def __init__(self, streams_body: bool = False) -> None:
        self.streams_body = streams_body
        self.seen: list[Any] = []

    def render(self, request: Any, ctx: LocationCtx) -> None:
        self.seen.append(request)
        respond_text(request, 200, b"handled " + request.uri)


@implementer(IStep)
class Later:
    """A step double that decides later (like a delaying limit_req)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []
        self.requests: list[Any] = []

    def check(self, request: Any, ctx: LocationCtx) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        self.requests.append(request)
        return d


SERVER = HttpServer(bind_addr="127.0.0.1:1")


def site_with(*locations: tuple[str, Any, list[Any]], ws: bool = False) -> tuple[ReverseSite, Clock]:
    clock = Clock()
    ctxs = [LocationCtx(f"loc[{i}]", Location(rule=rule, is_ws=ws), SERVER, compile_rule(rule, {}), handler=h,
                        steps=steps) for i, (rule, h, steps) in enumerate(locations)]
    site = ReverseSite(clock, VirtualHosts([([], ServerCtx(0, SERVER, ctxs))]), Limits(), "test")
    return site, clock


def connect(site: ReverseSite) -> tuple[Any, StringTransport]:
    ch = site.buildProtocol(None)
    t = StringTransport()
    ch.makeConnection(t)
    return ch, t


def test_seams_are_implemented() -> None:
    """The shipped handlers and steps provide the interfaces the edge features build on."""
    verifyObject(IHandler, StaticResponseHandler(Location(static_response="x")))
    verifyObject(IStep, AccessStep(load_text('[http]\nallow_ip = "::1"\n').config.http.allow_ip, None))  # type: ignore[union-attr,arg-type]
    verifyClass(IBodyReader, Exchange)
    loaded = load_text('[[http.server]]\nbind_addr = "127.0.0.1:1"\nproxy_url = "http://127.0.0.1:2"\n')
    handler = ReverseFeature(BuildContext(Clock()), loaded.config).sites[0][2].vhosts.default.locations[0].handler
    assert isinstance(handler, ProxyHandler)
    verifyObject(IHandler, handler)


def test_first_matching_location_and_404() -> None:
    """Locations are tried in order; no match is a 404."""
    a, b = Recorder(), Recorder()
    site, _ = site_with(("/a", a, []), ("/", b, []))
    ch, t = connect(site)
    ch.dataReceived(b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.uri for r in a.seen] == [b"/a/1"] and [r.uri for r in b.seen] == [b"/b"]
    site2, _ = site_with(("/only", Recorder(), []))
    ch2, t2 = connect(site2)
    ch2.dataReceived(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t2.value().startswith(b"HTTP/1.1 404 ")


def test_a_step_may_decide_later_and_the_handler_waits() -> None:
    """A step returning a Deferred holds the request; True lets it through, False stops it."""
    later, h = Later(), Recorder()
    site, _ = site_with(("/", h, [later]))
    ch, t = connect(site)
    ch.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.seen == [] and len(later.pending) == 1
    later.pending[0].callback(True)
    assert [r.uri for r in h.seen] == [b"/1"]
    ch.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    respond_text(later.requests[1], 503, b"later")  # a step that says False has answered itself
    later.pending[1].callback(False)
    assert len(h.seen) == 1 and b"HTTP/1.1 503 " in t.value()


def test_access_step_refuses_with_403_before_the_handler() -> None:
    """deny_ip stops the pipeline with 403; the handler never runs."""
    from wmproxy_tw.config.grammar import parse_ipset

    h = Recorder()
    site, _ = site_with(("/", h, [AccessStep(parse_ipset(""), parse_ipset("192.168.1.1"))]))
    ch, t = connect(site)
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 403 ") and h.seen == []


def test_websocket_upgrade_needs_is_ws() -> None:
    """An upgrade to a location without is_ws gets a 403 that says why."""
    h = Recorder()
    site, _ = site_with(("/", h, []))
    ch, t = connect(site)
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 403 ") and b"is_ws" in t.value() and h.seen == []


def test_static_response_with_variables_headers_and_rules() -> None:
    """static_response expands variables; static_headers and the location's response rules apply."""
    loaded = load_text("""
[[http.server]]
bind_addr = "127.0.0.1:1"
[[http.server.location]]
rule = "/hello"
static_response = "hi {client_ip} {path} {query}"
static_status = 201
static_headers = ["Content-Type text/html", "X-A 1"]
headers = ["+ X-Rule {method}"]
""")
    feature = ReverseFeature(BuildContext(Clock()), loaded.config)
    site = feature.sites[0][2]
    ch, t = connect(site)
    ch.dataReceived(b"GET /hello/w%6Frld?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    out = t.value()
    assert out.startswith(b"HTTP/1.1 201 ") and out.endswith(b"hi 192.168.1.1 /hello/world x=1")
    assert b"Content-Type: text/html\r\n" in out and b"X-A: 1\r\n" in out and b"X-Rule: GET\r\n" in out
    assert b"Content-Length: 31\r\n" in out and b" 201 Created\r\n" in out


@implementer(IHandler)
class Broken:
    """A handler whose body source fails midway (an upstream or a file that died)."""

    streams_body = False

    def render(self, request: Any, ctx: LocationCtx) -> None:
        from wmproxy_tw.reverse.request import end_incomplete

        request.setHeader(b"content-type", b"text/plain")
        request.write(b"first part")
        end_incomplete(request)


def test_end_incomplete_sends_what_was_written_then_closes_without_the_last_chunk() -> None:
    """A response that cannot be completed: the bytes written so far go out, then a close (not an
    abort that would drop them), no terminating chunk, and the access log says it was not complete."""
    from wmproxy_tw.observe.accesslog import AccessLogger, MemorySink
    from wmproxy_tw.headers import Template
    from wmproxy_tw.reverse.channel import CLOSE_GRACE

    site, clock = site_with(("/", Broken(), []))
    sink = MemorySink()
    site.vhosts.default.locations[0].access_log = AccessLogger(Template("{status} {body_bytes_sent} "
                                                                        "[{request_completion}]"), sink)
    ch, t = connect(site)
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    out = t.value()
    assert out.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\na\r\nfirst part\r\n" in out
    assert not out.endswith(b"0\r\n\r\n") and t.disconnecting and not getattr(t, "aborted", False)
    clock.advance(CLOSE_GRACE)  # the client never drained it: aborted after the grace
    ch.connectionLost(None)
    assert sink.lines == ["200 10 []"]


def test_request_completion_is_ok_for_a_finished_response() -> None:
    """{request_completion} is OK once the response ended normally (nginx's $request_completion)."""
    from wmproxy_tw.observe.accesslog import AccessLogger, MemorySink
    from wmproxy_tw.headers import Template

    site, _ = site_with(("/", Recorder(), []))
    sink = MemorySink()
    site.vhosts.default.locations[0].access_log = AccessLogger(Template("{status} [{request_completion}]"), sink)
    ch, t = connect(site)
    ch.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sink.lines == ["200 [OK]"] and not t.disconnecting


def test_route_decisions_are_cached_per_path_only_for_path_rules() -> None:
    """Path-only rules: the location is remembered per normalised path; a rule that also looks
    at the method is matched on every request (no cache), and still decides per method."""
    from wmproxy_tw.config.model import RuleTable

    a, b = Recorder(), Recorder()
    site, _ = site_with(("/a", a, []), ("/", b, []))
    ch, _t = connect(site)
    ch.dataReceived(b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /a/./1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.uri for r in a.seen] == [b"/a/1", b"/a/./1"] and [r.uri for r in b.seen] == [b"/b"]
    srv = site.vhosts.default
    assert srv._by_path is not None and set(srv._by_path) == {"/a/1", "/b"}

    post, other = Recorder(), Recorder()
    clock = Clock()
    table = RuleTable(path="/x", method="POST")
    ctxs = [LocationCtx("loc[0]", Location(), SERVER, compile_rule(table, {}), handler=post),
            LocationCtx("loc[1]", Location(), SERVER, compile_rule("/", {}), handler=other)]
    site2 = ReverseSite(clock, VirtualHosts([([], ServerCtx(0, SERVER, ctxs))]), Limits(), "test")
    assert site2.vhosts.default._by_path is None
    ch2, _t2 = connect(site2)
    ch2.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.method for r in post.seen] == [b"POST"] and [r.method for r in other.seen] == [b"GET"]
