"""The control API resource on DummyRequests: routing, auth, errors, answers."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from wmproxy_tw.config import load_text
from wmproxy_tw.control.api import ControlResource, IController, ReloadError
from wmproxy_tw.control.redact import REDACTED
from wmproxy_tw.service import ProxyService

pytestmark = pytest.mark.timeout(10)

CONFIG = load_text('control_token = "s3cret"\n[proxy]\nbind = "127.0.0.1:0"\nusername = "u"\npassword = "pw"\n',
                   "t.toml").config


@implementer(IController)
class FakeController:
    """Records what the API asked; answers synchronously unless told otherwise."""

    def __init__(self) -> None:
        self.stopped = 0
        self.reload_result: Any = {"kept": [], "opened": [], "closed": []}
        self.status_result: Any = {"pid": 1, "listeners": []}

    def control_status(self) -> Any:
        return self.status_result

    def control_metrics(self) -> Any:
        return b"# metrics\n"

    def control_config(self) -> Any:
        return CONFIG

    def control_reload(self) -> Any:
        if isinstance(self.reload_result, Exception):
            raise self.reload_result
        return self.reload_result

    def control_stop(self) -> None:
        self.stopped += 1


def call(res: ControlResource, method: bytes, path: bytes, headers: Optional[dict[bytes, bytes]] = None) -> DummyRequest:
    req = DummyRequest(path.lstrip(b"/").split(b"/"))
    req.method = method
    req.path = path
    req.uri = path
    for k, v in (headers or {}).items():
        req.requestHeaders.setRawHeaders(k, [v])
    req.render(res)
    return req


def body(req: DummyRequest) -> Any:
    return json.loads(b"".join(req.written))


def make(token: Optional[str] = None, metrics: bool = True) -> tuple[ControlResource, FakeController, Clock]:
    clock = Clock()
    ctl = FakeController()
    return ControlResource(ctl, token, metrics, clock.callLater), ctl, clock


def test_fake_and_service_provide_the_interface() -> None:
    """The test double and ProxyService both provide IController."""
    verifyObject(IController, FakeController())
    from twisted.internet.testing import MemoryReactorClock

    svc = ProxyService(MemoryReactorClock(), load_text('[proxy]\nbind = "127.0.0.1:0"\n', "t.toml"))
    verifyObject(IController, svc)


def test_status_without_token() -> None:
    """No control_token: GET /status answers 200 with the controller's document as JSON."""
    res, _ctl, _ = make()
    req = call(res, b"GET", b"/status")
    assert req.responseCode in (None, 200)
    assert req.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert body(req) == {"pid": 1, "listeners": []}


@pytest.mark.parametrize("auth", [None, b"Bearer wrong", b"Basic czNjcmV0", b"Bearer", b"bearer s3cret2"])
def test_token_required(auth: Optional[bytes]) -> None:
    """With control_token, a missing or wrong bearer token gets 401 and WWW-Authenticate."""
    res, _ctl, _ = make("s3cret")
    req = call(res, b"GET", b"/status", {b"authorization": auth} if auth else {})
    assert req.responseCode == 401
    assert req.responseHeaders.getRawHeaders(b"www-authenticate") == [b'Bearer realm="wmproxy"']
    assert "pid" not in body(req)


def test_right_token_and_scheme_case() -> None:
    """The right token is accepted, whatever the case of 'Bearer'."""
    res, _ctl, _ = make("s3cret")
    for scheme in (b"Bearer", b"bearer", b"BEARER"):
        req = call(res, b"GET", b"/status", {b"authorization": scheme + b" s3cret"})
        assert req.responseCode in (None, 200)


def test_unknown_path_and_wrong_method() -> None:
    """Unknown path → 404; a wrong method → 405 with Allow, for every route."""
    res, ctl, _ = make()
    assert call(res, b"GET", b"/nope").responseCode == 404
    req = call(res, b"GET", b"/reload")
    assert req.responseCode == 405 and req.responseHeaders.getRawHeaders(b"allow") == [b"POST"]
    req = call(res, b"DELETE", b"/status")
    assert req.responseCode == 405 and req.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert call(res, b"POST", b"/").responseCode == 405
    assert call(res, b"GET", b"/stop").responseCode == 405 and ctl.stopped == 0


def test_dashboard_page_needs_no_token_and_has_no_external_assets() -> None:
    """GET / is the static dashboard (no data, no external URL) even with a token set."""
    res, _ctl, _ = make("s3cret")
    req = call(res, b"GET", b"/")
    page = b"".join(req.written)
    assert req.responseCode in (None, 200)
    assert page.startswith(b"<!doctype html>") and b"/status" not in page.replace(b'fetch("status"', b"")
    assert b"http://" not in page and b"https://" not in page and b"<link" not in page
    assert b"default-src 'none'" in req.responseHeaders.getRawHeaders(b"content-security-policy")[0]


def test_reload_ok_and_refused() -> None:
    """POST /reload: 200 with the summary; a ReloadError → 400 with every message."""
    res, ctl, _ = make()
    req = call(res, b"POST", b"/reload")
    assert req.responseCode == 200 and body(req)["ok"] is True
    ctl.reload_result = ReloadError(["a.toml: proxy.bind: bad", "a.toml: workers: bad"])
    req = call(res, b"POST", b"/reload")
    assert req.responseCode == 400
    assert body(req) == {"ok": False, "errors": ["a.toml: proxy.bind: bad", "a.toml: workers: bad"]}


def test_reload_deferred() -> None:
    """A controller answering with a Deferred is answered when it fires (400 for a failure)."""
    res, ctl, _ = make()
    d: Deferred[Any] = Deferred()
    ctl.control_reload = lambda: d  # type: ignore[method-assign]
    req = call(res, b"POST", b"/reload")
    assert req.finished == 0
    d.errback(ReloadError(["nope"]))
    assert req.finished == 1 and req.responseCode == 400 and body(req)["errors"] == ["nope"]
    ctl.control_status = lambda: succeed({"ok": 1})  # type: ignore[method-assign]
    assert body(call(res, b"GET", b"/status")) == {"ok": 1}


def test_status_failure_is_500_and_logged(no_logged_errors: list[Any]) -> None:
    """A controller that fails /status gives 500 and logs the failure (never a silent hang)."""
    res, ctl, _ = make()
    ctl.control_status = lambda: fail(RuntimeError("boom"))  # type: ignore[method-assign]
    req = call(res, b"GET", b"/status")
    assert req.responseCode == 500 and "boom" in body(req)["errors"][0]
    assert len(no_logged_errors) == 1
    no_logged_errors.clear()


def test_stop_answers_then_stops() -> None:
    """POST /stop answers 202 first; the controller is stopped on the next turn of the clock."""
    res, ctl, clock = make()
    req = call(res, b"POST", b"/stop")
    assert req.responseCode == 202 and ctl.stopped == 0
    clock.advance(0)
    assert ctl.stopped == 1


def test_metrics_content_type_and_switch() -> None:
    """/metrics is Prometheus text; with metrics = false it is 404."""
    res, _ctl, _ = make()
    req = call(res, b"GET", b"/metrics")
    assert b"".join(req.written) == b"# metrics\n"
    assert req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
    res, _ctl, _ = make(metrics=False)
    assert call(res, b"GET", b"/metrics").responseCode == 404


def test_now_is_redacted() -> None:
    """/now shows the running config with the password and the control token redacted."""
    res, _ctl, _ = make("s3cret")
    doc = body(call(res, b"GET", b"/now", {b"authorization": b"Bearer s3cret"}))
    assert doc["proxy"]["username"] == "u" and doc["proxy"]["password"] == REDACTED
    assert doc["control_token"] == REDACTED
    assert "pw" not in json.dumps(doc) and "s3cret" not in json.dumps(doc)


def test_dns_rebinding_and_csrf_guards() -> None:
    """Without a token, a non-IP Host gets 421; a POST from a foreign Origin gets 403."""
    res, ctl, clock = make()
    assert call(res, b"GET", b"/status", {b"host": b"evil.example:8837"}).responseCode == 421
    for host in (b"127.0.0.1:8837", b"localhost", b"[::1]:8837", b"127.0.0.1"):
        assert call(res, b"GET", b"/status", {b"host": host}).responseCode in (None, 200), host
    req = call(res, b"POST", b"/stop", {b"host": b"127.0.0.1:8837", b"origin": b"http://evil.example"})
    assert req.responseCode == 403
    clock.advance(0)
    assert ctl.stopped == 0
    req = call(res, b"POST", b"/stop", {b"host": b"127.0.0.1:8837", b"origin": b"http://127.0.0.1:8837"})
    assert req.responseCode == 202
    res, _ctl, _ = make("s3cret")  # with a token, any Host name may be used (a proxy in front)
    req = call(res, b"GET", b"/status", {b"host": b"ops.example", b"authorization": b"Bearer s3cret"})
    assert req.responseCode in (None, 200)
