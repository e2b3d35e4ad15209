"""The control API: a twisted.web resource over an :class:`IController`.

========  ==========  =====================================================
method    path        answer
========  ==========  =====================================================
GET       ``/``       the dashboard page (static; its script reads /status)
GET       ``/status`` JSON: listeners, connections, upstreams, tunnel clients,
                      ``fleet`` (node_id, the live nodes) with ``[fleet]``
GET       ``/now``    JSON: the running configuration, secrets redacted
GET       ``/metrics`` Prometheus text (404 when ``metrics = false``)
POST      ``/reload`` 200 JSON summary, or 400 ``{"errors": [...]}``
POST      ``/stop``   202, then a graceful stop
========  ==========  =====================================================

Checks, in order: with ``control_token`` set, every path but ``/`` needs
``Authorization: Bearer TOKEN`` (compared in constant time; 401 otherwise).
The page itself holds no data, so it is served without the token: its
script sends the token it reads from the URL fragment (``/#token=...``,
never sent to the server) or asks for it.  Unknown path → 404, wrong method
→ 405 with ``Allow``.  Browsers are kept out of the API's write side: a
POST whose ``Origin`` is not the API's own is refused (403, against CSRF),
and without a token only requests whose ``Host`` is an IP literal or
``localhost`` are answered (421, against DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from importlib import resources
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import Interface

from ..config.model import Config
from ..observe.stats import CONTENT_TYPE
from .redact import running_config

__all__ = ["IController", "ReloadError", "ControlResource", "make_site"]

_log = Logger()


class ReloadError(Exception):
    """A reload was refused; ``errors`` holds every message (the old config runs on)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class IController(Interface):
    """What the control API drives: a :class:`~wmproxy_tw.service.ProxyService`,
    or the supervisor of worker processes.  Each method may return a Deferred."""

    def control_status() -> Any:
        """The /status document (a dict, or a Deferred firing with one)."""

    def control_metrics() -> Any:
        """The Prometheus text exposition (bytes, or a Deferred firing with them)."""

    def control_config() -> Config:
        """The running configuration (the API redacts it)."""

    def control_reload() -> Any:
        """Re-read the configuration file and apply it: a summary dict (or a Deferred);
        raise (or fail with) :class:`ReloadError`."""

    def control_stop() -> None:
        """Stop gracefully (the API has already answered)."""


_GET, _POST = (b"GET", b"HEAD"), (b"POST",)
_ROUTES: dict[bytes, tuple[tuple[bytes, ...], str]] = {
    b"/": (_GET, "dashboard"),
    b"/status": (_GET, "status"),
    b"/now": (_GET, "now"),
    b"/metrics": (_GET, "metrics"),
    b"/reload": (_POST, "reload"),
    b"/stop": (_POST, "stop"),
}


def _dashboard_html() -> bytes:
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


class ControlResource(resource.Resource):
    """Every path of the control API (one leaf: routing is a table)."""

    isLeaf = True

    def __init__(self, controller: IController, token: Optional[str], metrics: bool,
                 call_later: Callable[..., Any]) -> None:
        super().__init__()
        self.controller = controller
        self.token = token.encode() if token else None
        self.metrics = metrics
        self.call_later = call_later
        self.page = _dashboard_html()

    # -- checks -------------------------------------------------------------
    def render(self, request: server.Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        path = request.path
        route = _ROUTES.get(path)
        if self.token is None and not _local_host(request.getHeader(b"host")):
            return _error(request, 421, "the control API without control_token answers only to "
                                        "an IP address or localhost in Host")
        if self.token is not None and path != b"/" and not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="wmproxy"')
            return _error(request, 401, "missing or wrong bearer token (Authorization: Bearer <control_token>)")
        if route is None or (route[1] == "metrics" and not self.metrics):
            return _error(request, 404, f"no such path: {path.decode('latin-1')}"
                          + (" (metrics = false)" if route is not None else ""))
        methods, name = route
        if request.method not in methods:
            request.setHeader(b"allow", b", ".join(methods))
            return _error(request, 405, f"{path.decode()} accepts {', '.join(m.decode() for m in methods)}")
        if request.method == b"POST" and not _same_origin(request):
            return _error(request, 403, "cross-origin request refused")
        handler: Callable[[server.Request], Any] = getattr(self, "_" + name)
        return handler(request)

    def _authorized(self, request: server.Request) -> bool:
        assert self.token is not None
        value = request.getHeader(b"authorization") or b""
        scheme, _, given = value.partition(b" ")
        ok = hmac.compare_digest(given.strip(), self.token)  # always compared: no early exit
        return scheme.lower() == b"bearer" and ok

    # -- handlers -------------------------------------------------------------
    def _dashboard(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                          b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                          b"frame-ancestors 'none'")
        request.setHeader(b"x-frame-options", b"DENY")
        return self.page

    def _status(self, request: server.Request) -> Any:
        return self._later(request, self.controller.control_status, lambda doc: _json(request, 200, doc))

    def _now(self, request: server.Request) -> bytes:
        return _json(request, 200, running_config(self.controller.control_config()))

    def _metrics(self, request: server.Request) -> Any:
        def done(text: bytes) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return text

        return self._later(request, self.controller.control_metrics, done)

    def _reload(self, request: server.Request) -> Any:
        def failed(f: Failure) -> bytes:
            if f.check(ReloadError):
                return _json(request, 400, {"ok": False, "errors": f.value.errors})
            _log.failure("control API: reload crashed", f)
            return _json(request, 500, {"ok": False, "errors": [f"internal error: {f.getErrorMessage()}"]})

        return self._later(request, self.controller.control_reload,
                           lambda summary: _json(request, 200, dict(ok=True, **summary)), failed)

    def _stop(self, request: server.Request) -> bytes:
        # answer first; the stop closes this listener
        self.call_later(0, self.controller.control_stop)
        return _json(request, 202, {"ok": True, "stopping": True})

    # -- plumbing ---------------------------------------------------------------
    def _later(self, request: server.Request, call: Callable[[], Any], ok: Callable[[Any], bytes],
               failed: Optional[Callable[[Failure], bytes]] = None) -> Any:
        """Run ``call`` (maybe a Deferred) and answer with ``ok(result)``/``failed(failure)``."""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _f: gone.append(True))

        def fail(f: Failure) -> bytes:
            if failed is not None:
                return failed(f)
            _log.failure("control API: {path} failed", f, path=request.path.decode("latin-1"))
            return _error(request, 500, f"internal error: {f.getErrorMessage()}")

        def write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        d: Deferred[Any] = maybeDeferred(call)
        if d.called:  # answer synchronously when we can (DummyRequest-friendly)
            box: list[Any] = []
            d.addCallbacks(ok, fail).addBoth(box.append)
            return box[0]
        d.addCallbacks(ok, fail).addCallback(write)
        d.addErrback(lambda f: _log.failure("control API: answering failed", f))
        return server.NOT_DONE_YET


def _json(request: server.Request, status: int, doc: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc, indent=1, sort_keys=False, default=str).encode() + b"\n"


def _error(request: server.Request, status: int, message: str) -> bytes:
    return _json(request, status, {"ok": False, "errors": [message]})


def _local_host(host: Optional[bytes]) -> bool:
    """True for an IP literal or localhost, with or without a port."""
    if not host:
        return True  # HTTP/1.0 clients send none; browsers always do
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        name = text.split(":")[0]
    else:
        name = text
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _same_origin(request: server.Request) -> bool:
    """No Origin (curl, wmproxy), or an Origin whose host:port is this request's Host."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
    parts = urlsplit(origin.decode("latin-1"))
    return bool(parts.netloc) and parts.netloc.lower() == host


class _QuietSite(server.Site):
    """No access log: the dashboard polls every second."""

    def log(self, request: Any) -> None:
        pass


def make_site(controller: IController, config: Config, reactor: Any) -> server.Site:
    """The control API's site for ``config`` (token, metrics switch)."""
    site = _QuietSite(ControlResource(controller, config.control_token, config.metrics, reactor.callLater))
    site.noisy = False
    site.displayTracebacks = False
    return site
