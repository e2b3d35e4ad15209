"""Header rules and ``{variable}`` templates: the one implementation (SPEC §2).

Used by the reverse proxy (request and response rules, ``static_response``,
hash keys), the access log and the tunnel's http mappings.

Strings here are *byte strings in Latin-1 clothing*: every header value,
path and template output is a ``str`` whose code points are the bytes that
go on the wire (``value.encode("latin-1")`` never fails).  Literal text from
the configuration is UTF-8 encoded into that form when a template is
compiled, so ``static_response = "你好 {client_ip}"`` reaches the client as
UTF-8.

Templates understand ``{name}``, ``{name(arg)}`` (e.g. ``{d(%Y-%m-%d)}``),
``${name}`` and ``$name``.  What a name means is up to the caller's *lookup*
``(name, arg) -> str | None``; :class:`RequestVars` is the lookup for the
request variables of SPEC §2 (``client_ip``, ``client_addr``, ``host``,
``url``, ``path``, ``scheme``, and a few nginx-style extras).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, MutableSequence, Optional, Sequence, Union

from .config.grammar import HeaderRule

__all__ = [
    "Lookup",
    "Template",
    "RequestVars",
    "CompiledRule",
    "compile_rules",
    "split_rules",
    "apply_header_rules",
    "apply_request_rules",
    "apply_response_rules",
    "wire_text",
]

Lookup = Callable[[str, Optional[str]], Optional[str]]

_VAR = re.compile(
    r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\(([^()]*)\))?\}"  # {name} / {name(arg)}
    r"|\$\{([A-Za-z_][A-Za-z0-9_]*)\}"  # ${name}
    r"|\$([A-Za-z_][A-Za-z0-9_]*)"  # $name
)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def wire_text(text: str) -> str:
    """Configuration text (Unicode) in the Latin-1 clothing of its UTF-8 bytes."""
    return text if text.isascii() else text.encode("utf-8").decode("latin-1")


class Template:
    """A compiled template; :meth:`render` fills it from a lookup.

    A name the lookup does not know (it returns None) is left as written, or
    replaced by ``missing`` when one is given (the access log uses ``"-"``).
    """

    __slots__ = ("text", "_parts", "constant")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[Union[str, tuple[str, Optional[str], str]]] = []
        pos = 0
        for m in _VAR.finditer(text):
            if m.start() > pos:
                parts.append(wire_text(text[pos:m.start()]))
            name = m.group(1) or m.group(3) or m.group(4)
            parts.append((name, m.group(2), wire_text(m.group(0))))
            pos = m.end()
        if pos < len(text):
            parts.append(wire_text(text[pos:]))
        self._parts = parts
        self.constant: Optional[str] = None
        if all(isinstance(p, str) for p in parts):
            self.constant = "".join(p for p in parts if isinstance(p, str))

    def render(self, lookup: Lookup, missing: Optional[str] = None) -> str:
        if self.constant is not None:
            return self.constant
        out = []
        for p in self._parts:
            if isinstance(p, str):
                out.append(p)
                continue
            value = lookup(p[0], p[1])
            if value is None:
                value = p[2] if missing is None else missing
            out.append(value)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


@dataclass
class RequestVars:
    """The variables of one request, as a :data:`Lookup` (call it).

    ``host`` is the Host header as sent; ``url`` the request-target as sent
    (path and query); ``path`` the normalised, percent-decoded path.
    ``header`` looks a request header up by name (for ``{http_NAME}``).
    """

    client_ip: str = ""
    client_port: int = 0
    host: str = ""
    url: str = "/"
    path: str = "/"
    query: str = ""
    scheme: str = "http"
    method: str = "GET"
    header: Optional[Callable[[str], Optional[str]]] = None

    def __call__(self, name: str, arg: Optional[str] = None) -> Optional[str]:
        getter = _REQUEST_VARS.get(name)
        if getter is not None:
            return getter(self)
        if name.startswith("http_") and self.header is not None:
            value = self.header(name[5:].replace("_", "-"))
            return "" if value is None else value
        return None

    @property
    def client_addr(self) -> str:
        ip = self.client_ip
        return f"[{ip}]:{self.client_port}" if ":" in ip else f"{ip}:{self.client_port}"


_REQUEST_VARS: dict[str, Callable[[RequestVars], str]] = {
    "client_ip": lambda v: v.client_ip,
    "remote_addr": lambda v: v.client_ip,
    "client_addr": lambda v: v.client_addr,
    "host": lambda v: v.host,
    "url": lambda v: v.url,
    "request_uri": lambda v: v.url,
    "path": lambda v: v.path,
    "uri": lambda v: v.path,
    "query": lambda v: v.query,
    "args": lambda v: v.query,
    "scheme": lambda v: v.scheme,
    "method": lambda v: v.method,
    "request_method": lambda v: v.method,
}


@dataclass(frozen=True)
class CompiledRule:
    """A :class:`~wmproxy_tw.config.grammar.HeaderRule` with its value compiled."""

    op: str  # set | add | del | default
    name: str
    lname: str
    value: Template


def compile_rules(rules: Iterable[HeaderRule]) -> tuple[CompiledRule, ...]:
    return tuple(CompiledRule(r.op, r.name, r.name.lower(), Template(r.value)) for r in rules)


def split_rules(rules: Iterable[HeaderRule]) -> tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]:
    """``(request rules, response rules)``, compiled, in file order."""
    rules = tuple(rules)
    return (compile_rules(r for r in rules if r.target == "request"),
            compile_rules(r for r in rules if r.target != "request"))


def apply_header_rules(headers: MutableSequence[tuple[str, str]], rules: Sequence[CompiledRule],
                       lookup: Lookup) -> None:
    """Apply ``rules`` in order to a list of ``(name, value)`` pairs, in place.

    ``set`` replaces every field of that name by one; ``add`` appends;
    ``del`` removes every field of that name; ``default`` sets only when the
    name is absent.  Names compare case-insensitively.  Control characters
    a variable may carry (a decoded ``%0d%0a`` in ``{path}``) are removed, so
    a rule can never split a header.
    """
    for rule in rules:
        if rule.op == "del":
            headers[:] = [h for h in headers if h[0].lower() != rule.lname]
            continue
        if rule.op == "default" and any(h[0].lower() == rule.lname for h in headers):
            continue
        value = rule.value.render(lookup)
        if rule.value.constant is None:
            value = _CONTROL.sub("", value)
        if rule.op == "set":
            headers[:] = [h for h in headers if h[0].lower() != rule.lname]
        headers.append((rule.name, value))


@lru_cache(maxsize=256)
def _split_cached(rules: tuple[HeaderRule, ...]) -> tuple[tuple[CompiledRule, ...], tuple[CompiledRule, ...]]:
    return split_rules(rules)


def _apply_to_list(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule], response: bool,
                   variables: Mapping[str, str]) -> list[tuple[str, str]]:
    out = list(headers)
    apply_header_rules(out, _split_cached(tuple(rules))[response], lambda name, arg: variables.get(name))
    return out


def apply_request_rules(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule],
                        variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """The request headers sent upstream after the ``proxy ...`` rules (a new list).

    ``variables`` is a plain name → value mapping (the tunnel's http mappings);
    the reverse proxy uses :func:`apply_header_rules` with :class:`RequestVars`.
    """
    return _apply_to_list(headers, rules, False, variables)


def apply_response_rules(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule],
                         variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """The response headers sent back after the response rules (a new list)."""
    return _apply_to_list(headers, rules, True, variables)
