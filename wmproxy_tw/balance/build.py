"""From configuration to upstream groups: the one place that resolves a target.

``proxy_url`` / ``up_name`` name either an upstream group in scope (location,
then server, then the section) or a literal ``host:port``, which becomes a
one-member group.  Reverse proxy, stream and WebSocket all resolve through
:func:`resolve_target`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from ..config import model as cm
from ..config.grammar import parse_address
from .model import GroupSpec, HealthCheckSpec, MemberSpec

__all__ = ["group_spec", "find_group", "Target", "resolve_target"]

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443, "tcp": None}


def group_spec(up: cm.Upstream) -> GroupSpec:
    """The balance-layer spec of a configured ``[[*.upstream]]`` group."""
    hc = None
    if up.health_check is not None:
        h = up.health_check
        hc = HealthCheckSpec(interval=h.interval, path=h.path, expect=h.expect, timeout=h.timeout,
                             fall=h.fall, rise=h.rise, kind=h.kind)
    members = tuple(
        MemberSpec(host=m.addr.host, port=m.addr.port, weight=m.weight, max_fails=m.max_fails,
                   fail_timeout=m.fail_timeout or 30.0, backup=m.backup, down=m.down)
        for m in up.server
    )
    return GroupSpec(name=up.name, members=members, lb=up.lb, hash_key=up.hash_key, health_check=hc)


@dataclass(frozen=True)
class Target:
    """Where a handler sends its traffic: a scheme, a group, and a path prefix."""

    scheme: str  # http | https | ws | wss | tcp
    group: GroupSpec
    path: str  # "" when the URL had no path
    host_header: str  # the name in the URL (for Host / SNI)
    named_group: bool  # True when the URL named a configured group


_URL = re.compile(r"^(?:(?P<scheme>https?|wss?|tcp)://)?(?P<authority>[^/?#]+)(?P<path>/[^#]*)?$")


def resolve_target(url: str, scopes: Iterable[Iterable[cm.Upstream]], default_scheme: str = "http") -> Target:
    """Resolve ``url`` against the upstream groups visible from where it is used.

    ``scopes`` is ordered innermost first (location, server, section).  Raises
    ``ValueError`` with a message naming what was expected.
    """
    m = _URL.match(url.strip())
    if not m:
        raise ValueError(f"cannot use {url!r} as a target: expected 'scheme://group-or-host[:port][/path]'")
    scheme = m.group("scheme") or default_scheme
    authority = m.group("authority")
    path = m.group("path") or ""
    for scope in scopes:
        for up in scope:
            if up.name == authority:
                return Target(scheme, group_spec(up), path, authority, True)
    host_port = authority
    port_default = _DEFAULT_PORTS.get(scheme)
    if not re.search(r":\d+$", authority) or authority.endswith("]"):
        if port_default is None:
            raise ValueError(f"{url!r}: no upstream group named {authority!r} and no port given")
        host_port = f"{authority}:{port_default}"
    try:
        addr = parse_address(host_port)
    except ValueError as e:
        raise ValueError(f"{url!r}: no upstream group named {authority!r}, and not host:port ({e})") from None
    host_header = authority
    spec = GroupSpec(name=authority, members=(MemberSpec(host=addr.host, port=addr.port),))
    return Target(scheme, spec, path, host_header, False)


def find_group(name: Optional[str], scopes: Iterable[Iterable[cm.Upstream]]) -> Optional[GroupSpec]:
    """The configured group called ``name`` (innermost scope first), or None."""
    if not name:
        return None
    for scope in scopes:
        for up in scope:
            if up.name == name:
                return group_spec(up)
    return None
