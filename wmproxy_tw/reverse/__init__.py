"""reverse capability: the ``[http]`` section — virtual hosts, locations, proxying.

A byte's path: listener → :class:`~wmproxy_tw.reverse.channel.HTTP11Channel`
(HTTP/1.1 parsing, limits, body streaming) → a
:class:`~wmproxy_tw.reverse.request.ReverseRequest` → :class:`ReverseSite`
``.dispatch`` (virtual host by Host, location by rule, steps, handler; see
:mod:`wmproxy_tw.reverse.handlers` for the pipeline and how to extend it) →
for ``proxy_url`` an :class:`~wmproxy_tw.reverse.proxy.Exchange` over a
pooled :class:`~wmproxy_tw.reverse.upstream.UpstreamConnection`.

``service.py`` uses :func:`plan_lines`, :func:`unsupported` and
:func:`build_reverse`.
"""

from .handlers import unsupported
from .site import ReverseProxy, ReverseSite, build_reverse, plan_lines

__all__ = ["ReverseProxy", "ReverseSite", "build_reverse", "plan_lines", "unsupported"]
