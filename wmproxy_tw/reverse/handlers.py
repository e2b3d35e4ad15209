"""The handler seam of a location, and the handlers the reverse proxy ships.

Pipeline per request (SPEC §4), run by :meth:`ReverseSite.dispatch
<wmproxy_tw.reverse.site.ReverseSite.dispatch>` when the request head is
complete::

    location match (none → 404)
      → WebSocket upgrade to a location without is_ws → 403
      → the location's client_max_body_size → 413
      → ctx.steps, in order: IStep.check(request, ctx)   (allow_ip/deny_ip → 403; limit_req → 503 or a delay)
      → ctx.handler: IHandler.render(request, ctx)       (proxy_url | static_response | file_server, try_paths around it)

The request is a :class:`~wmproxy_tw.reverse.request.ReverseRequest` (a
twisted.web ``Request``: a handler may also hand it to a twisted.web
resource's ``render``); it adds ``vars`` (the {variables}), ``norm_path``,
``query``, ``host_name``, ``client_ip``, ``scheme`` and the body seam.  Its
``channel`` is the client connection
(:class:`~wmproxy_tw.reverse.channel.HTTP11Channel`).

Extending it:

* a new **handler** implements :class:`IHandler` and is chosen in
  :func:`build_handler` (a wrapper such as try_paths takes the inner handler);
  a handler that wants the request body as it arrives sets
  ``streams_body = True`` and calls ``request.stream_body(reader)`` with an
  :class:`IBodyReader`; otherwise the body is drained before ``render`` is
  called;
* a new **step** implements :class:`IStep` and is added in
  :func:`build_steps`; it answers itself and returns False to stop the
  pipeline, or returns a Deferred firing True/False to delay it;
* a feature that is parsed but not built yet is listed by
  :func:`unsupported` — the one place start-up refuses it
  (``not supported yet: ...``); remove it there when it lands.

Handlers answer with the twisted.web ``Request`` API; :func:`respond_error`
and :func:`respond_text` are the helpers for short plain answers.  Response
header rules of the location are applied by the request itself just before
the head is written, whatever the handler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ..balance import UpstreamGroup
from ..balance.build import Target
from ..config.grammar import IPSet
from ..config.model import Config, FileServer, HttpServer, Location
from ..headers import CompiledRule, Template, apply_header_rules, compile_rules, split_rules
from ..limits import LimitReqStep, access_allowed
from .files import FileHandler
from .h1 import reason
from .route import Rule
from .trypaths import TryPaths, TryPathsHandler

__all__ = [
    "IHandler",
    "IBodyReader",
    "IStep",
    "LocationCtx",
    "AccessStep",
    "StaticResponseHandler",
    "ProxyHandler",
    "respond_error",
    "respond_text",
    "unsupported",
    "build_steps",
    "build_handler",
]

_log = Logger()


class IBodyReader(Interface):
    """Receives a request body from ``request.stream_body(reader)``."""

    def body_data(data: bytes) -> None:
        """The next piece of the (de-chunked) body."""

    def body_end() -> None:
        """The body is complete."""

    def body_failed(status: int, message: str) -> None:
        """The body broke off (too large, malformed, client gone); the
        channel answers the client itself, the reader only cleans up."""


class IHandler(Interface):
    """What a location does with a request that passed its steps."""

    streams_body = Attribute("True: render() is called at once and reads the body through "
                             "request.stream_body(); False: the body is drained first.")

    def render(request: Any, ctx: "LocationCtx") -> None:
        """Answer ``request`` (now or later) through the twisted.web Request API."""


class IStep(Interface):
    """A check before the handler (access control, rate limits)."""

    def check(request: Any, ctx: "LocationCtx") -> Any:
        """True to go on; False after answering; or a Deferred firing one of them."""


@dataclass
class LocationCtx:
    """A compiled ``[[http.server.location]]``: what the pipeline runs."""

    path: str  # "http.server[0].location[1]", for messages
    config: Location
    server: HttpServer
    rule: Rule
    handler: Any = None
    steps: list[Any] = field(default_factory=list)
    request_rules: tuple[CompiledRule, ...] = ()
    response_rules: tuple[CompiledRule, ...] = ()
    access_log: Any = None

    @property
    def is_ws(self) -> bool:
        return self.config.is_ws


_PLAIN = (("Content-Type", "text/plain; charset=utf-8"),)


def respond_text(request: Any, status: int, body: bytes, headers: Sequence[tuple[str, str]] = _PLAIN) -> None:
    """A complete small answer with ``Content-Length`` (``headers`` in Latin-1 clothing)."""
    if request._disconnected or request.finished:
        return
    if request.startedWriting:
        if request.channel is not None:
            request.channel.transport.abortConnection()
        return
    request.setResponseCode(status, reason(status).encode())
    h = request.responseHeaders
    for k, v in headers:
        if k.lower() != "content-length":
            h.addRawHeader(k.encode("latin-1"), v.encode("latin-1"))
    h.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def respond_error(request: Any, status: int, detail: str = "") -> None:
    """A short plain-text error page (internal reasons are logged, not shown)."""
    text = f"{status} {reason(status)}\n" + (f"{detail}\n" if detail else "")
    respond_text(request, status, text.encode())


@implementer(IStep)
class AccessStep:
    """``allow_ip`` / ``deny_ip`` → 403 (:func:`wmproxy_tw.limits.access_allowed` decides)."""

    def __init__(self, allow: IPSet, deny: IPSet) -> None:
        self.allow = allow
        self.deny = deny

    def check(self, request: Any, ctx: LocationCtx) -> bool:
        ip = request.client_ip
        if not access_allowed(ip, self.allow, self.deny):
            _log.info("reverse proxy: {client} refused by allow_ip/deny_ip of {where}", client=ip, where=ctx.path)
            respond_error(request, 403)
            return False
        return True


@implementer(IHandler)
class StaticResponseHandler:
    """``static_response`` (with variables), ``static_status``, ``static_headers``."""

    streams_body = False

    def __init__(self, loc: Location) -> None:
        self.body = Template(loc.static_response or "")
        self.status = loc.static_status
        self.headers = compile_rules(r for r in (loc.static_headers or ()) if r.target != "request")

    def render(self, request: Any, ctx: LocationCtx) -> None:
        v = request.vars
        pairs = list(_PLAIN)
        apply_header_rules(pairs, self.headers, v)
        respond_text(request, self.status, self.body.render(v).encode("latin-1"), pairs)


@implementer(IHandler)
class ProxyHandler:
    """``proxy_url``: stream the request to a member of an upstream group."""

    streams_body = True

    def __init__(self, reactor: Any, pool: Any, group: UpstreamGroup, target: Target, loc: Location,
                 request_rules: tuple[CompiledRule, ...], tls: Any = None) -> None:
        from .proxy import Exchange

        self._exchange = Exchange
        self.clock = reactor
        self.pool = pool
        self.group = group
        self.target = target
        self.path = target.path
        self.host_header = target.host_header
        self.tls = tls
        self.tls_key = (target.scheme, id(tls)) if tls is not None else None
        self.request_rules = request_rules
        self.trusted_proxies = loc.trusted_proxies or IPSet()
        self.connect_timeout = loc.proxy_connect_timeout or 10.0
        self.read_timeout = loc.proxy_read_timeout or 60.0
        self.write_timeout = loc.proxy_write_timeout or 60.0
        self.rate_limit = loc.rate_limit  # response bodies paced per client connection
        self.next_upstream = loc.proxy_next_upstream is not False
        self.ws_idle_timeout = max(loc.proxy_read_timeout or 60.0, loc.client_timeout or 60.0)
        spec = group.spec
        self._hash = Template(spec.hash_key) if spec.lb == "hash" and spec.hash_key else None
        self._ip_hash = spec.lb == "ip_hash"

    def balance_key(self, request: Any) -> Optional[str]:
        if self._ip_hash:
            return str(request.client_ip)
        if self._hash is not None:
            return self._hash.render(request.vars)
        return None

    def render(self, request: Any, ctx: LocationCtx) -> None:
        self._exchange(self, request, ctx).start()


# -- building ---------------------------------------------------------------------------


def _has(value: Optional[str]) -> bool:
    return bool(value and value.strip())


def unsupported(config: Config) -> list[str]:
    """Keys of ``[http]`` that parse but are not served yet — refused at start-up.

    The one list (empty now: every key of ``[http]`` is served); a key added
    to the model before it is built goes here.
    """
    return []


def build_steps(loc: Location, env: Any) -> list[Any]:
    """The checks before the handler, in pipeline order: access lists, then
    ``limit_req`` (its zone from ``env.zones``, by name)."""
    steps: list[Any] = []
    if loc.allow_ip or loc.deny_ip:
        steps.append(AccessStep(loc.allow_ip or IPSet(), loc.deny_ip or IPSet()))
    rule = loc.limit_req
    if rule is not None:
        zone = env.zones.get(rule.zone)
        if zone is None:
            known = ", ".join(sorted(env.zones)) or "none"
            raise ValueError(f"{env.where}.limit_req: no limit_req_zone named {rule.zone!r} (defined: {known})")
        key = Template(zone.key_template)
        steps.append(LimitReqStep(zone, rule, lambda request: key.render(request.vars, missing=""), env.clock))
    return steps


def build_handler(loc: Location, where: str, env: Any) -> Any:
    """The handler of a location; ValueError names what is wrong.

    ``env`` gives ``proxy_handler(loc, request_rules)`` (groups, pool and
    TLS live there), ``clock`` and ``file_cache`` (one per feature).
    ``try_paths`` wraps whatever handler the location has.
    """
    handler: Any
    if loc.static_response is not None:
        handler = StaticResponseHandler(loc)
    elif _has(loc.proxy_url):
        handler = env.proxy_handler(loc, split_rules(loc.headers or ())[0])
    elif loc.file_server is not None or _has(loc.root):
        if loc.file_server is None:  # a bare root: a file server with the defaults
            loc = loc.model_copy(update={"file_server": FileServer()})
        handler = FileHandler.from_location(loc, env.clock, env.file_cache)
    else:
        raise ValueError(f"{where}: nothing to serve: set proxy_url, static_response or file_server")
    if loc.try_paths:
        try:
            tries = TryPaths.parse(loc.try_paths)
        except ValueError as e:
            raise ValueError(f"{where}.try_paths: {e}") from None
        handler = TryPathsHandler(handler, tries, _expander)
    return handler


def _expander(request: Any) -> Any:
    """``try_paths`` candidates: templates over the request's variables."""
    lookup = request.vars
    return lambda text: Template(text).render(lookup)
