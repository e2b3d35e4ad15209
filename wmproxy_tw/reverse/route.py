"""Location rules and virtual hosts (SPEC §4), compiled once per configuration.

A rule string is a path pattern: ``/api`` (prefix, as nginx), ``=/exact``,
a glob with ``*`` (whole path), ``~regex`` / ``~*regex`` (search, the second
case-insensitive), or ``@NAME`` (an entry of ``http.match_names``; the
built-in ``@ws`` means "a WebSocket upgrade request").  A table
``{path, host, method, client_ip, scheme}`` matches when every key given
matches.  Matching sees the normalised path, without the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, Optional, Sequence, TypeVar, Union

from ..config.grammar import IPSet
from ..config.model import RuleTable

__all__ = ["RouteInfo", "Rule", "compile_rule", "VirtualHosts", "host_matcher"]


@dataclass
class RouteInfo:
    """What a rule looks at."""

    path: str
    host: str  # Host without port, lower case
    method: str
    client_ip: str
    scheme: str
    websocket: bool = False


Predicate = Callable[[RouteInfo], bool]


@dataclass(frozen=True)
class Rule:
    """A compiled location rule; ``prefix`` is set for plain prefix rules
    (what a path in ``proxy_url`` replaces)."""

    text: str
    test: Predicate
    prefix: Optional[str] = None
    #: The rule looks at the path only (so a decision may be cached per path).
    path_only: bool = False

    def matches(self, info: RouteInfo) -> bool:
        return self.test(info)


def _path_predicate(pattern: str) -> tuple[Callable[[str], bool], Optional[str]]:
    if pattern.startswith("~"):
        flags = 0
        body = pattern[1:]
        if body.startswith("*"):
            flags, body = re.IGNORECASE, body[1:]
        rx = re.compile(body.strip(), flags)
        return (lambda p: rx.search(p) is not None), None
    if pattern.startswith("="):
        exact = pattern[1:].strip()
        return (lambda p: p == exact), None
    if "*" in pattern:
        rx = re.compile("".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)),
                        re.DOTALL)
        return (lambda p: rx.fullmatch(p) is not None), None
    return (lambda p: p.startswith(pattern)), pattern


def host_matcher(pattern: str) -> Callable[[str], bool]:
    """``example.com`` (exact), ``*.example.com`` (any subdomain), ``~regex``."""
    if pattern.startswith("~"):
        rx = re.compile(pattern[1:].strip(), re.IGNORECASE)
        return lambda h: rx.search(h) is not None
    p = pattern.lower().rstrip(".")
    if p.startswith("*."):
        suffix = p[1:]
        return lambda h: h.endswith(suffix) and len(h) > len(suffix)
    return lambda h: h == p


def _methods(text: str) -> frozenset[str]:
    return frozenset(m.upper() for m in re.split(r"[\s,|]+", text.strip()) if m)


def compile_rule(rule: Union[str, RuleTable], match_names: Mapping[str, Union[str, RuleTable]],
                 _seen: tuple[str, ...] = ()) -> Rule:
    """Compile a location rule; ValueError for an unknown or circular ``@NAME``."""
    if isinstance(rule, str):
        text = rule.strip()
        if text.startswith("@"):
            name = text[1:]
            if name in _seen:
                raise ValueError(f"match_names: {' -> @'.join(('@' + _seen[0],) + _seen[1:] + (name,))} is circular")
            if name in match_names:
                inner = compile_rule(match_names[name], match_names, _seen + (name,))
                return Rule(text, inner.test, inner.prefix, inner.path_only)
            if name == "ws":
                return Rule(text, lambda info: info.websocket)
            raise ValueError(f"rule {text!r}: no match_names entry {name!r}")
        test, prefix = _path_predicate(text)
        return Rule(text, lambda info: test(info.path), prefix, path_only=True)
    checks: list[Predicate] = []
    prefix = None
    if rule.path:
        ptest, prefix = _path_predicate(rule.path)
        checks.append(lambda info: ptest(info.path))
    if rule.host:
        htest = host_matcher(rule.host)
        checks.append(lambda info: htest(info.host))
    if rule.method:
        methods = _methods(rule.method)
        checks.append(lambda info: info.method in methods)
    if rule.client_ip is not None:
        ips: IPSet = rule.client_ip
        checks.append(lambda info: info.client_ip in ips)
    if rule.scheme:
        scheme = rule.scheme
        checks.append(lambda info: info.scheme == scheme)
    desc = "{" + ", ".join(f"{k} = {getattr(rule, k)!r}" for k in ("path", "host", "method", "client_ip", "scheme")
                           if getattr(rule, k) is not None) + "}"
    only_path = not (rule.host or rule.method or rule.client_ip is not None or rule.scheme)
    return Rule(desc, lambda info: all(c(info) for c in checks), prefix, path_only=only_path)


T = TypeVar("T")


class VirtualHosts(Generic[T]):
    """The servers of one listening address, chosen by host name.

    ``entries`` is ``[(names, server), ...]`` in configuration order; names
    are exact host names or ``*.suffix`` wildcards (``up_name`` may list
    several, separated by spaces).  No match: the first server, the default.
    """

    def __init__(self, entries: Sequence[tuple[Sequence[str], T]]) -> None:
        if not entries:
            raise ValueError("a listener needs at least one server")
        self.default = entries[0][1]
        self.exact: dict[str, T] = {}
        self.wild: list[tuple[str, T]] = []
        for names, srv in entries:
            for n in names:
                n = n.lower().rstrip(".")
                if n.startswith("*."):
                    self.wild.append((n[1:], srv))
                elif n and n not in self.exact:
                    self.exact[n] = srv
        self.servers = [srv for _n, srv in entries]

    def pick(self, host: str) -> T:
        srv = self.exact.get(host)
        if srv is not None:
            return srv
        for suffix, wsrv in self.wild:
            if host.endswith(suffix) and len(host) > len(suffix):
                return wsrv
        return self.default
