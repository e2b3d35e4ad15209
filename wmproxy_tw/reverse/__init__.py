"""reverse capability: the ``[http]`` section — virtual hosts, locations, proxying.

A byte's path: listener → :class:`~wmproxy_tw.reverse.channel.HTTP11Channel`
(HTTP/1.1 parsing, limits, body streaming) → a
:class:`~wmproxy_tw.reverse.request.ReverseRequest` → :class:`ReverseSite`
``.dispatch`` (virtual host by Host, location by rule, steps, handler; see
:mod:`wmproxy_tw.reverse.handlers` for the pipeline and how to extend it) →
for ``proxy_url`` an :class:`~wmproxy_tw.reverse.proxy.Exchange` over a
pooled :class:`~wmproxy_tw.reverse.upstream.UpstreamConnection`.

``service.py`` lists :func:`build` in ``BUILDERS`` and refuses what
:func:`unsupported` names.
"""

from .handlers import unsupported
from .site import ReverseFeature, ReverseSite, build

__all__ = ["ReverseFeature", "ReverseSite", "build", "unsupported"]
