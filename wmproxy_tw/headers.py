"""Header rules (SPEC §2): apply ``[proxy] [OP] NAME VALUE`` rules to a header list.

Rules come parsed from the configuration (:class:`wmproxy_tw.config.grammar.HeaderRule`).
Request rules (``proxy ...``) act on the request sent upstream, the others on the response sent
back.  Values may hold variables, ``{client_ip}`` or ``$client_ip`` style; unknown variables are
left as written.  Headers are ``(name, value)`` string pairs, names compared case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .config.grammar import HeaderRule

__all__ = ["apply_request_rules", "apply_response_rules", "expand"]

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand(value: str, variables: Mapping[str, str]) -> str:
    """Replace ``{name}`` and ``$name`` by their values (unknown names stay as written)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    text = _VARIABLE.sub(one, value)
    return text.replace("\r", " ").replace("\n", " ")


def _apply(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule], target: str,
           variables: Mapping[str, str]) -> list[tuple[str, str]]:
    out = list(headers)
    for rule in rules:
        if rule.target != target:
            continue
        name = rule.name.lower()
        if rule.op == "del":
            out = [(k, v) for k, v in out if k.lower() != name]
            continue
        value = expand(rule.value, variables)
        if rule.op == "add":
            out.append((rule.name, value))
        elif rule.op == "default":
            if not any(k.lower() == name for k, _ in out):
                out.append((rule.name, value))
        else:  # set: replace every field of that name by one
            out = [(k, v) for k, v in out if k.lower() != name]
            out.append((rule.name, value))
    return out


def apply_request_rules(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule],
                        variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """The request headers sent upstream after the ``proxy ...`` rules."""
    return _apply(headers, rules, "request", variables)


def apply_response_rules(headers: Iterable[tuple[str, str]], rules: Iterable[HeaderRule],
                         variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """The response headers sent back after the response rules."""
    return _apply(headers, rules, "response", variables)
