"""The running configuration as JSON, with every secret replaced.

Redacted: values of keys that name a secret (``password``, ``control_token``,
``tokens``, anything with *pass*, *token*, *secret*, *credential*,
*private* or *api_key* in its name, also unknown keys); the password in a
URL's user-info (``redis://:pw@host``); the value of header rules that set a
credential header (``Authorization``, ``Cookie``, ``X-Api-Key``...).
Paths of certificate and key files stay: they are not key material.
"""

from __future__ import annotations

import re
from typing import Any

from ..config.model import Config

__all__ = ["REDACTED", "redact", "running_config"]

REDACTED = "<redacted>"

_SECRET_KEY = re.compile(r"pass|token|secret|credential|private|api_?key", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/@\s:]*):(?P<pw>[^/@\s]*)@", re.I)
_SECRET_HEADER = re.compile(r"^(authorization|proxy-authorization|cookie|set-cookie|x-api-key|"
                            r".*token.*|.*secret.*|.*api-key.*|.*password.*)$", re.I)
# a header rule as config/model.py writes it: [proxy] [+|-|?] NAME VALUE
_HEADER_RULE = re.compile(r"^(?P<head>(?:proxy\s+)?(?:[+?]\s+)?(?P<name>\S+)\s+)(?P<value>.+)$", re.S)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a JSON-able tree with secrets replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if key in ("headers", "static_headers"):
            return [_header_rule(v) if isinstance(v, str) else redact(v) for v in value]
        if key and _SECRET_KEY.search(key):
            return [REDACTED for _ in value]
        return [redact(v) for v in value]
    if value is None or value == "" or isinstance(value, bool):
        return value
    if key and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", value)
    return value


def _header_rule(rule: str) -> str:
    m = _HEADER_RULE.match(rule)
    if m is None or not _SECRET_HEADER.match(m.group("name")):
        return redact(rule)
    return m.group("head") + REDACTED


def running_config(config: Config) -> dict[str, Any]:
    """``/now``: the configuration as running, through pydantic, redacted."""
    return redact(config.model_dump(mode="json"))
