"""/now redaction: secrets never leave the process, paths and the rest do."""

from __future__ import annotations

import json

import pytest

from wmproxy_tw.config import load_text
from wmproxy_tw.control.redact import REDACTED, redact, running_config

pytestmark = pytest.mark.timeout(10)


def test_running_config_redacts_every_secret() -> None:
    """Passwords, tokens, the control token and unknown secret-looking keys are redacted; key paths stay."""
    text = '''
control_token = "ctl-secret"
[proxy]
bind = "127.0.0.1:0"
username = "alice"
password = "pw-secret"
tokens = "tok-one tok-two"
cert = "/etc/wmproxy/cert.pem"
key = "/etc/wmproxy/key.pem"
api_key = "typo-secret"
'''
    loaded = load_text(text, "t.toml")
    doc = running_config(loaded.config)
    dumped = json.dumps(doc)
    for secret in ("ctl-secret", "pw-secret", "tok-one", "tok-two", "typo-secret"):
        assert secret not in dumped
    assert doc["control_token"] == REDACTED and doc["proxy"]["password"] == REDACTED
    assert doc["proxy"]["tokens"] == [REDACTED, REDACTED]
    assert doc["proxy"]["username"] == "alice"
    assert doc["proxy"]["cert"] == "/etc/wmproxy/cert.pem" and doc["proxy"]["key"] == "/etc/wmproxy/key.pem"


def test_unset_secrets_stay_null() -> None:
    """An unset password shows as null (it is not there), not as '<redacted>'."""
    doc = running_config(load_text('[proxy]\nbind = "127.0.0.1:0"\n', "t.toml").config)
    assert doc["proxy"]["password"] is None and doc["control_token"] is None


def test_url_passwords_and_credential_headers() -> None:
    """User-info passwords in URLs and values of credential header rules are redacted."""
    doc = redact({
        "fleet": {"redis": "redis://:hunter2@10.0.0.1:6379/0"},
        "proxy_url": "http://bob:pw@backend/v1",
        "headers": ["proxy Authorization 'Bearer abc'", "proxy + X-Api-Key k123", "+ Cookie a=b",
                    "X-Frame-Options DENY", "- Server", "proxy ? X-Session-Token t0k"],
    })
    assert doc["fleet"]["redis"] == f"redis://:{REDACTED}@10.0.0.1:6379/0"
    assert doc["proxy_url"] == f"http://bob:{REDACTED}@backend/v1"
    assert doc["headers"] == [f"proxy Authorization {REDACTED}", f"proxy + X-Api-Key {REDACTED}",
                              f"+ Cookie {REDACTED}", "X-Frame-Options DENY", "- Server",
                              f"proxy ? X-Session-Token {REDACTED}"]
